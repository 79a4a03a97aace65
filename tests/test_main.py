"""The command line: one-line errors, refusals that lose nothing, and a tiny
train -> evaluate -> export -> segment run end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from stt_jax.data import sources
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# three levels: the command line's behaviour does not depend on depth, and
# each command compiles its programs afresh
TINY = ["--config.model.widths=(4,6,8)", "--config.model.downsample_z=(False,False)",
        "--config.model.norm_groups=2",
        "--config.data.synthetic.train_shape=(8,64,64)",
        "--config.data.synthetic.val_shape=(8,64,64)",
        "--config.data.patch_shape=(4,32,32)", "--config.infer.window=(4,32,32)",
        "--config.train.steps=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=2", "--config.decode.min_size=8",
        "--config.eval.min_gt_size=10", "--config.infer.block_shape=(8,32,32)",
        "--config.decode.block_shape=(4,32,32)", "--quiet"]


def _main(*args, check_ok=True):
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "stt_jax.main",
                         "--config=configs/demo.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check_ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _export_leaves(directory):
  """The parameter arrays of an export, in tree order."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ")
  for n in needles:
    assert n in lines[0], lines[0]


def test_unknown_config_key(tmp_path):
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.train.stepz=3",
                        check_ok=False), "--config.train.stepz:", 'Did you mean "steps"')


def test_unknown_config_group_lists_what_is_there(tmp_path):
  """No close match to suggest: the error lists the fields of the deepest group that exists."""
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.optim.lr=1e-3", check_ok=False),
                  "--config.optim.lr:", "config has no field 'optim'", "train", "model")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.data.nosuch.x=3", check_ok=False),
                  "config.data has no field 'nosuch'", "patch_shape")
  assert not os.path.exists(f"{tmp_path}/w")


def test_weight_decay_exempt_of_a_missing_module_touches_no_folder(tmp_path):
  """The baseline has no SST blocks: refused, with its module names, before the run folder."""
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.train.weight_decay_exempt=('sst',)",
                        check_ok=False), "'sst' starts the name of no module", "enc0")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.train.weight_decay_exempt=(sst,)",
                        check_ok=False), "train.weight_decay_exempt", "quoted", "'(sst,)'")
  assert not os.path.exists(f"{tmp_path}/w")


def test_bad_config_value(tmp_path):
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.data.patch_shape=(4,30,32)",
                        check_ok=False), "data.patch_shape")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.train.steps=abc",
                        check_ok=False), "train.steps")


def test_a_repeated_override_means_its_last_value(tmp_path):
  """ml_collections alone would join the two tuples into a 6-long window."""
  from stt_jax import main  # pylint: disable=g-import-not-at-top
  argv = ["stt_jax.main", "--config=configs/demo.py", "--config.infer.window=(4,32,32)",
          "--config.train.steps=3", "--quiet", "--config.infer.window=(4,64,64)"]
  assert main._last_override_wins(argv) == [  # pylint: disable=protected-access
      "stt_jax.main", "--config=configs/demo.py", "--config.train.steps=3", "--quiet",
      "--config.infer.window=(4,64,64)"]
  # the space-separated form counts as the same key; a boolean key alone stays as it is
  assert main._last_override_wins([  # pylint: disable=protected-access
      "p", "--config.infer.window", "(4,32,32)", "--config.loss.class_balance",
      "--config.infer.window=(4,16,16)", "--config.train.steps", "-1", "--quiet"]) == [
          "p", "--config.loss.class_balance", "--config.infer.window=(4,16,16)",
          "--config.train.steps=-1", "--quiet"]
  # the last window is read alone: refused for its own size, not for its length
  proc = _main(f"--workdir={tmp_path}/w", "--config.infer.window=(4,32,32)",
               "--config.infer.window=(4,30,32)", check_ok=False)
  _one_line_error(proc, "infer.window: (4, 30, 32) must be a multiple")


def test_stop_at_is_a_step_of_a_training_schedule(tmp_path):
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.train.steps=4", "--stop_at=5",
                        check_ok=False), "--stop_at=5: give a step from 1 to train.steps (4)")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--mode=export", "--stop_at=2",
                        check_ok=False), "it does nothing with --mode=export")
  assert not os.path.exists(tmp_path / "w")


def test_checkpoint_flag_needs_a_run_folder_state(tmp_path):
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--mode=evaluate", "--checkpoint=last",
                        check_ok=False), "--checkpoint=last: give latest, best or a step")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--checkpoint=best", check_ok=False),
                  "it does nothing with --mode=train")
  _one_line_error(_main("--mode=segment", f"--weights={tmp_path}/e", "--checkpoint=4",
                        f"--input={tmp_path}/i.zarr", f"--output={tmp_path}/o",
                        check_ok=False), "an export holds one state")


def test_missing_config_file_and_data_path(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/nope.py",
                         f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  _one_line_error(proc, "nope.py")
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.data.synthetic.enabled=False",
                        "--config.data.train.image=/no/such/image.zarr",
                        "--config.data.train.label=/no/such/labels.zarr",
                        check_ok=False), "data.train.image", "/no/such/image.zarr")
  assert not os.path.exists(tmp_path / "w")  # a failed start leaves no run folder behind
  # a volume given to a config that generates its data: refused, not replaced
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--config.data.train.image=/my/image.zarr",
                        "--config.data.val.label=/my/labels.zarr", check_ok=False),
                  "config.data.synthetic.enabled: is on",
                  "data.train.image, data.val.label", "--config.data.synthetic.enabled=False")
  assert not os.path.exists(tmp_path / "w")


def test_preview_sections_and_label_dtypes_are_checked_before_the_work(tmp_path):
  image = sources.write_array(str(tmp_path / "im.zarr"), np.zeros((4, 32, 32), np.uint8)).path
  export = str(tmp_path / "export")
  _baseline_export(export)
  out = str(tmp_path / "seg")
  _one_line_error(_main("--mode=segment", f"--weights={export}", f"--input={image}",
                        f"--output={out}", "--config.infer.preview_sections=(1,4)",
                        check_ok=False),
                  "infer.preview_sections [4] lie outside the volume's sections 0..3")
  assert not os.path.exists(out)
  ids = sources.write_array(str(tmp_path / "ids.zarr"), np.ones((4, 32, 32), np.uint32)).path
  floats = sources.write_array(str(tmp_path / "f.zarr"), np.ones((4, 32, 32), np.float32)).path
  _one_line_error(_main("--mode=evaluate", f"--input={ids}", f"--labels={floats}",
                        check_ok=False), "--labels", "float32", "integer instance ids")


def test_segment_and_evaluate_need_a_run_folder_or_an_export(tmp_path):
  _one_line_error(_main("--mode=segment", f"--input={tmp_path}/in.zarr",
                        f"--output={tmp_path}/out", check_ok=False), "--workdir", "--weights")
  assert not os.path.exists(tmp_path / "out")
  _one_line_error(_main("--mode=evaluate", check_ok=False), "--workdir", "--weights", "--output")


def test_config_file_that_raises(tmp_path):
  bad = tmp_path / "bad_config.py"
  bad.write_text("def get_config():\n  raise RuntimeError('boom')\n")
  proc = subprocess.run([sys.executable, "-m", "stt_jax.main", f"--config={bad}",
                         f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  _one_line_error(proc, "RuntimeError", "boom")


def test_init_from_with_a_missing_or_foreign_source(tmp_path):
  work = tmp_path / "w"
  missing = _main(f"--workdir={work}", *TINY, f"--config.train.init_from={tmp_path}/nope",
                  check_ok=False)
  _one_line_error(missing, "train.init_from", "does not exist")
  (tmp_path / "plain").mkdir()
  foreign = _main(f"--workdir={work}", *TINY, f"--config.train.init_from={tmp_path}/plain",
                  check_ok=False)
  _one_line_error(foreign, "train.init_from", "neither an stt_jax export")
  assert not os.path.exists(work)  # checked before the run folder is made


def _baseline_export(directory, widths=(4, 6, 8), norm="none", info=None):
  """An export of a 2-output baseline with random, fan-in scaled weights
  (built from the shapes alone: no initialiser compiled). Returns its leaf count."""
  from stt_jax.config import default_config  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  cfg = default_config()
  cfg.model.widths = widths
  cfg.model.downsample_z = (False,) * (len(widths) - 1)
  cfg.model.norm, cfg.model.norm_groups = norm, 2
  shapes = jax.eval_shape(unet.from_config(cfg.model).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 4, 32, 32, 1), np.float32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(
          s.dtype) if len(s.shape) > 1 else np.zeros(s.shape, s.dtype), shapes)
  checkpoint.export_weights(directory, params, cfg.model.to_dict(), info=info)
  return len(jax.tree.leaves(params))


def test_group_norm_export_on_other_windows_says_so_and_a_region_reads_around(tmp_path):
  """GroupNorm's statistics span the window: inferring on windows of another
  shape than the training patches shifts the calibration, and segment says so."""
  export = str(tmp_path / "export")
  _baseline_export(export, norm="group", info={"training_patch_shape": [4, 32, 32]})
  image = str(tmp_path / "image.zarr")
  sources.write_array(image, np.random.default_rng(0).integers(0, 255, (4, 64, 64), np.uint8))
  proc = _main("--mode=segment", f"--weights={export}", f"--input={image}",
               f"--output={tmp_path / 'seg'}", "--config.infer.window=(4,64,64)",
               "--config.infer.block_shape=(4,64,64)",
               *[a for a in TINY if "infer." not in a])
  notes = [l for l in proc.stdout.splitlines() if "GroupNorm" in l]
  assert notes == ["note: this GroupNorm model trained on (4,32,32) patches and infers on "
                   "(4,64,64) windows, which shifts its calibration (larger windows "
                   "over-cover at a fixed decode.foreground); to match, pass "
                   '--config.infer.window="(4,32,32)"'], proc.stdout
  # --region reads the image around its box: the whole run's probabilities there
  _main("--mode=segment", f"--weights={export}", f"--input={image}", "--region=((1,8,8),(4,56,40))",
        f"--output={tmp_path / 'box'}", "--config.infer.window=(4,64,64)",
        "--config.infer.block_shape=(4,64,64)", *[a for a in TINY if "infer." not in a])
  read = lambda d: sources.open_volume(str(tmp_path / d / "probabilities.zarr")).read(
      [0, 0, 0, 0], [*sources.open_volume(str(tmp_path / d / "probabilities.zarr")).shape])
  np.testing.assert_array_equal(read("box"), read("seg")[1:4, 8:56, 8:40])


def test_segment_in_parts_from_the_command_line(tmp_path):
  """Two parts, one after the other (as two array jobs might run): the first
  says what is left, the second predicts the rest and decodes."""
  export = str(tmp_path / "export")
  _baseline_export(export)
  image = str(tmp_path / "image.zarr")
  sources.write_array(image, np.random.default_rng(0).integers(0, 255, (4, 64, 64), np.uint8))
  out = tmp_path / "seg"
  tiny = [a for a in TINY if "block_shape" not in a]
  part = lambda i, *more, ok=True: _main(
      "--mode=segment", f"--weights={export}", f"--input={image}", f"--output={out}",
      "--config.infer.block_shape=(4,32,32)", "--config.decode.block_shape=(4,32,32)",
      f"--part={i}/2", *more, *tiny, check_ok=ok)
  first = part(0).stdout.splitlines()[-1]  # rows of blocks 0 and 1 of 2
  assert first.startswith("part 0/2: predicted 2 blocks in "), first
  assert first.endswith(f"s; 2 blocks of other parts still to predict (the part that "
                        f"finishes last decodes) -> {out}"), first
  [last] = [l for l in part(1).stdout.splitlines() if l.startswith("part")]
  assert last.startswith("part 1/2: predicted 2 blocks; with every part's blocks done it "
                         "decoded (4, 64, 64), in "), last
  assert json.load(open(out / "segment.json"))["finished"]
  _one_line_error(part(1, ok=False), "already holds a finished segmentation")
  for flag, needle in (("--part=2/2", "give I/N with 0 <= I < N"),
                       ("--part=a/b", "give I/N"),
                       ("--overwrite", "would let one part delete the others' work")):
    _one_line_error(_main("--mode=segment", f"--weights={export}", f"--input={image}",
                          f"--output={tmp_path / 'other'}", f"--part=0/2", flag, *tiny,
                          check_ok=False) if flag == "--overwrite" else
                    _main("--mode=segment", f"--weights={export}", f"--input={image}",
                          f"--output={tmp_path / 'other'}", flag, *tiny, check_ok=False),
                    needle)
  _one_line_error(_main(f"--workdir={tmp_path}/w", "--part=0/2", *TINY, check_ok=False),
                  "--part splits --mode=segment", "--mode=train")
  assert not os.path.exists(tmp_path / "other")


def test_nan_loss_stops_with_one_line(tmp_path):
  work = tmp_path / "nan"
  proc = _main(f"--workdir={work}", *TINY, "--config.train.learning_rate=1e30",
               "--config.train.warmup_steps=1", "--config.train.log_every=1",
               "--config.train.checkpoint_every=1000", check_ok=False)
  _one_line_error(proc, "training diverged", "no checkpoint was written")
  assert not os.path.exists(work / "checkpoints" / "4")


def test_train_evaluate_export_segment_end_to_end(tmp_path):
  """Started from another model's export (train.init_from), with the
  adversarial loss and the EMA on: export holds the EMA weights.
  With the optional distance output: a third channel all the way through
  (trained, exported, segmented from the checkpoint and from the export)."""
  work = str(tmp_path / "run")
  adv = ["--config.loss.adversarial_weight=0.5", "--config.train.ema_decay=0.5",
         "--config.model.discriminator.features=(4,8)", "--config.train.eval_every=4",
         "--config.model.outputs=('mask','contour','distance')",
         "--config.train.schedule=cosine",
         "--config.train.keep_checkpoints=4"]  # step 2 is evaluated after 4, 5 and 6
  # started from a 2-output baseline's export: all but the head copied
  source = str(tmp_path / "baseline_export")
  leaves = _baseline_export(source, norm="group")  # the demo's GroupNorm
  proc = _main(f"--workdir={work}", *TINY, *adv, f"--config.train.init_from={source}")
  assert (f"init_from {source} (export): copied {leaves - 2} of {leaves} parameter tensors"
          in proc.stdout)
  assert "2 of another shape kept fresh (head/bias (2,) vs (3,), head/kernel" in proc.stdout
  assert "best validation ap_75" in proc.stdout and os.path.isdir(os.path.join(work, "best"))
  assert "AP-75" in proc.stdout and "foreground Jaccard" in proc.stdout
  scores = json.load(open(os.path.join(work, "eval.json")))
  assert 0.0 <= scores["jaccard"] <= 1.0 and scores["num_gt"] > 0
  sweep = scores["mask_threshold_sweep"]
  assert len(sweep) == 23 and list(sweep)[-5:] == ["0.95", "0.96", "0.97", "0.98", "0.99"]
  assert "voxel Jaccard of mask > t" in proc.stdout
  assert "objects of mean mask probability < s removed: " in proc.stdout
  assert "object_mean_mask_sweep" in scores and "best_object_mean_mask" in scores
  assert scores["best_mask_threshold_jaccard"] == max(v["jaccard"] for v in sweep.values())
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]

  # the same folder again: refused, nothing lost
  again = _main(f"--workdir={work}", *TINY, *adv, check_ok=False)
  _one_line_error(again, "--resume", "--overwrite")
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]

  # resume to 6 steps, stopping at 5 on the way (--stop_at): the schedule is
  # the 6-step one, the stop saved, not scored, and not an error
  eval_before = os.path.getmtime(os.path.join(work, "eval.json"))
  proc = _main(f"--workdir={work}", "--resume", *TINY, *adv, "--config.train.steps=6",
               "--stop_at=5")
  assert ("note: this run started with train.steps=4; its cosine learning rate now "
          "decays over 6 steps, so it jumps at this resume") in proc.stdout
  assert "stopped at step 5 of 6 (--stop_at)" in proc.stdout
  assert "best validation ap_75" in proc.stdout and "AP-75" not in proc.stdout
  assert "5" in os.listdir(os.path.join(work, "checkpoints"))
  assert os.path.getmtime(os.path.join(work, "eval.json")) == eval_before
  _one_line_error(_main(f"--workdir={work}", "--resume", *TINY, *adv,
                        "--config.train.steps=6", "--stop_at=5", check_ok=False),
                  "--stop_at=5: the run in", "is at step 5 already")
  proc = _main(f"--workdir={work}", "--resume", *TINY, *adv, "--config.train.steps=6")
  assert "6" in os.listdir(os.path.join(work, "checkpoints"))

  proc = _main(f"--workdir={work}", "--mode=evaluate", *TINY, *adv, "--checkpoint=2")
  scores = json.load(open(os.path.join(work, "eval.json")))
  assert scores["jaccard"] == pytest.approx(
      float([l.split()[-1] for l in proc.stdout.splitlines()
             if l.startswith("foreground Jaccard")][0]), abs=1e-4)
  assert scores["weights"] == f"checkpoints/2 of {work} (EMA weights)"
  assert f"weights: checkpoints/2 of {work} (EMA weights)" in proc.stdout
  # the same state's live weights, scored into a folder of their own (the run's
  # eval.json and segmentation stay) and exported: other weights
  live_dir = str(tmp_path / "eval_live")
  proc = _main(f"--workdir={work}", "--mode=evaluate", *TINY, *adv, "--checkpoint=2",
               "--noema", f"--output={live_dir}")
  live = json.load(open(os.path.join(live_dir, "eval.json")))
  assert live["weights"] == f"checkpoints/2 of {work} (live weights)"
  assert json.load(open(os.path.join(work, "eval.json")))["weights"] == scores["weights"]
  assert os.path.isdir(os.path.join(live_dir, "val_segmentation", "instances.zarr"))
  assert f"scores written to {live_dir}/eval.json" in proc.stdout
  _one_line_error(_main(f"--workdir={work}", "--mode=evaluate", *TINY, *adv,
                        f"--output={live_dir}", check_ok=False), "exists", "--overwrite")
  exported_leaves = {}
  for kind, flag in (("ema", "--ema"), ("live", "--noema")):
    out = str(tmp_path / f"export2_{kind}")
    _main(f"--workdir={work}", "--mode=export", f"--output={out}", *TINY, *adv,
          "--checkpoint=2", flag)
    assert json.load(open(os.path.join(out, "stt_jax_export.json")))["weights"] == kind
    exported_leaves[kind] = _export_leaves(out)
  assert len(exported_leaves["ema"]) == len(exported_leaves["live"])
  assert any(not np.array_equal(a, b)
             for a, b in zip(exported_leaves["ema"], exported_leaves["live"]))
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  missing = _main(f"--workdir={work}", "--mode=evaluate", *TINY, *adv, "--checkpoint=3",
                  check_ok=False)
  _one_line_error(missing, "--checkpoint=3", "holds steps 2, 4, 5, 6; pick one, best or latest")
  [best_step] = checkpoint.saved_steps(os.path.join(work, "best"))

  export = str(tmp_path / "export")
  out = _main(f"--workdir={work}", "--mode=export", f"--output={export}", *TINY, *adv,
              "--checkpoint=best")
  assert f"exported inference weights (best/{best_step} of {work} (EMA weights))" in out.stdout
  exported = json.load(open(os.path.join(export, "stt_jax_export.json")))
  assert exported["weights"] == "ema" and exported["training_patch_shape"] == [4, 32, 32]
  assert exported["from"] == f"best/{best_step} of {work} (EMA weights)"
  val_image = os.path.join(work, "data", "val", "image.zarr")
  seg_a, seg_b = str(tmp_path / "seg_ckpt"), str(tmp_path / "seg_export")
  _main(f"--workdir={work}", "--mode=segment", f"--input={val_image}",
        f"--output={seg_a}", *TINY, *adv, "--checkpoint=best")  # the exported state
  # from an export, as the README shows it: no --workdir needed
  _main("--mode=segment", f"--weights={export}",
        f"--input={val_image}", f"--output={seg_b}", *TINY)
  # an export exported again still says its weights are the EMA's
  _main("--mode=export", f"--weights={export}", f"--output={tmp_path}/export2", *TINY)
  noema = _main("--mode=export", f"--weights={export}", f"--output={tmp_path}/export3",
                "--noema", *TINY, check_ok=False)
  _one_line_error(noema, "--noema", "an export (--weights) holds one set")
  assert not os.path.exists(tmp_path / "export3")
  again = json.load(open(os.path.join(tmp_path, "export2", "stt_jax_export.json")))
  assert again["weights"] == "ema" and again["from"] == f"export {export}"
  assert again["training_patch_shape"] == [4, 32, 32]
  read = lambda d, n: sources.open_volume(os.path.join(d, n)).read(
      [0, 0, 0], sources.open_volume(os.path.join(d, n)).shape)
  np.testing.assert_array_equal(read(seg_a, "instances.zarr"), read(seg_b, "instances.zarr"))
  assert read(seg_a, "probabilities.zarr").shape == (8, 64, 64, 3)
  assert os.path.exists(os.path.join(seg_a, "morphology.csv"))

  # decode the stored probabilities again (no model): the same instances
  redecoded = str(tmp_path / "redecoded")
  _main("--mode=decode", f"--input={seg_a}/probabilities.zarr", f"--image={val_image}",
        f"--output={redecoded}", *TINY)
  np.testing.assert_array_equal(read(seg_a, "instances.zarr"),
                                read(redecoded, "instances.zarr"))
  assert os.listdir(os.path.join(redecoded, "previews"))
  # score a segmentation folder against labels: one table, JSON written
  val_labels = os.path.join(work, "data", "val", "labels.zarr")
  proc = _main("--mode=evaluate", f"--input={seg_a}", f"--labels={val_labels}",
               f"--compare={seg_b}", *TINY)
  assert "voxel MCC" in proc.stdout
  # 8 x 64 x 64 is one bootstrap tile: no interval, and it says so
  assert ("Jaccard --input - --compare: +0.0000 (1 tiles of 16x256x256: too few for an "
          "interval)") in proc.stdout
  assert "AP-75 --input - --compare: +0.0000" in proc.stdout  # the same segmentation
  written = json.load(open(os.path.join(seg_a, "eval.json")))
  assert "mcc" in written and written["compare"]["b"].startswith(seg_b)
  assert (written["ci_tiles"], written["jaccard_ci95"]) == (1, None)
  _one_line_error(_main(f"--workdir={work}", "--mode=evaluate", f"--compare={seg_b}", *TINY,
                        check_ok=False), "--compare scores a second segmentation",
                  "without --labels")
  wrong = _main("--mode=evaluate", f"--input={seg_a}", f"--labels={val_image}x", *TINY,
                check_ok=False)
  _one_line_error(wrong, "--labels: volume not found")

  # an existing output is never overwritten without --overwrite
  refused = _main(f"--workdir={work}", "--mode=segment", f"--input={val_image}",
                  f"--output={seg_a}", *TINY, *adv, check_ok=False)
  _one_line_error(refused, "--overwrite")


def test_out_of_device_memory_is_one_line_other_runtime_errors_keep_their_traceback(
    monkeypatch, capsys):
  import types
  from stt_jax import main

  def failing(error):
    def run(argv):
      raise error
    return run

  oom = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.\n"
      "BufferAssignment OOM Debugging.\n" + "allocation 0: size 8589934592\n" * 40)
  monkeypatch.setattr(main, "_MODE", types.SimpleNamespace(value="segment"))
  monkeypatch.setattr(main, "run", failing(oom))
  with pytest.raises(SystemExit) as exited:
    main._main(["stt_jax.main"])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: out of device memory in --mode=segment")
  assert "infer.block_shape" in err and "8589934592 bytes" in err
  monkeypatch.setattr(main, "run", failing(jax.errors.JaxRuntimeError("INTERNAL: a bug")))
  with pytest.raises(jax.errors.JaxRuntimeError, match="a bug"):
    main._main(["stt_jax.main"])


def test_a_decoding_without_instances_says_why(tmp_path):
  """--mode=decode of maps that never pass decode.seed_mask (an undertrained
  model's): '0 instances' and, on the next line, the highest mask
  probability and the knobs; the same in segment.json."""
  rng = np.random.default_rng(0)
  probs = np.stack([rng.integers(0, 200, (8, 32, 32)), rng.integers(0, 50, (8, 32, 32))],
                   -1).astype(np.uint8)
  source = sources.write_array(str(tmp_path / "p.zarr"), probs)
  proc = _main("--mode=decode", f"--input={source.path}", f"--output={tmp_path / 'out'}",
               "--config.decode.block_shape=(4,16,16)", "--config.decode.halo=(2,4,4)")
  lines = proc.stdout.splitlines()
  assert lines[-2].endswith(f"0 instances -> {tmp_path / 'out' / 'instances.zarr'}"), lines
  assert lines[-1] == ("0 instances: no voxel's mask probability exceeds decode.seed_mask "
                       f"0.90 (the highest is {probs[..., 0].max() / 255:.3f}); train "
                       "longer, or lower decode.seed_mask and decode.foreground (0.85) "
                       "below it")
  manifest = json.load(open(tmp_path / "out" / "segment.json"))
  assert manifest["max_mask_probability"] == pytest.approx(probs[..., 0].max() / 255,
                                                           abs=1e-4)


def test_decode_of_a_binned_models_probabilities_is_at_the_images_voxels(tmp_path):
  """A model.input_scale run writes coarse probabilities that say which voxels
  they were predicted for; --mode=decode decodes them there, as segment did."""
  from stt_jax.data import rescaled  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import blockwise  # pylint: disable=g-import-not-at-top
  z, y, x = np.mgrid[:8, :16, :16]
  blob = np.exp(-((y - 7.5) ** 2 + (x - 5.5) ** 2) / 12.0 - (z - 3.5) ** 2 / 20.0)
  probs = np.stack([255 * blob, 40 * np.ones_like(blob)], -1).astype(np.uint8)
  source = sources.create_volume(
      str(tmp_path / "p.zarr"), probs.shape, np.uint8, voxel_size_nm=(30, 16, 16),
      attributes=rescaled.full_resolution_attributes((8, 32, 31), (1, 2, 2), (0, 0, 0),
                                                     (30, 8, 8)))
  source.write([0, 0, 0, 0], probs)
  overrides = ["--config.decode.block_shape=(4,16,16)", "--config.decode.halo=(2,4,4)",
               "--config.decode.seed_mask=0.8", "--config.decode.foreground=0.5",
               "--config.decode.min_size=4"]
  _main("--mode=decode", f"--input={source.path}", f"--output={tmp_path / 'out'}", *overrides)
  out = sources.open_volume(str(tmp_path / "out" / "instances.zarr"))
  assert out.shape == (8, 32, 31) and out.voxel_size_nm == (30.0, 8.0, 8.0)
  fine = rescaled.full_resolution(sources.open_volume(source.path))
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import demo  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  decode = demo.get_config().decode
  decode.update(block_shape=(4, 16, 16), halo=(2, 4, 4), seed_mask=0.8, foreground=0.5,
                min_size=4)
  settings = blockwise.DecodeSettings.from_config(decode)
  expected, _ = blockwise.decode(fine, str(tmp_path / "expected"), settings)
  got = out.read([0, 0, 0], out.shape)
  np.testing.assert_array_equal(got, expected.read([0, 0, 0], expected.shape))
  assert got.max() == 1
