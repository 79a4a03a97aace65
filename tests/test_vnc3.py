"""configs/vnc3.py on the real VNC III sections (../shared/data/vnc3): a few
training steps on CPU, then sections 12-15 segmented and scored end to end
through the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stt_jax.data import datasets, sources
from stt_jax.infer import blockwise, postprocess
from tests.conftest import shared_data
from tests.infer.test_blockwise import probabilities_from_labels, same_up_to_relabelling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import vnc3  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def stack1_labels():
  """The instance labels of sections 0-15 as the config's two splits read
  them, [16, 1024, 1024]."""
  shared_data("vnc3", "stack1")
  cfg = vnc3.get_config("baseline")
  _, train = datasets.open_split(cfg, "train")
  _, val = datasets.open_split(cfg, "val")
  assert train.shape == (12, 1024, 1024) and val.shape == (4, 1024, 1024)
  return np.concatenate([train.read([0, 0, 0], train.shape), val.read([0, 0, 0], val.shape)])


def test_masks_become_global_connected_components(stack1_labels):
  folder = shared_data("vnc3", "stack1", "mitochondria")
  raw = sources.open_volume(folder).read([0, 0, 0], (16, 1024, 1024))
  labels = stack1_labels
  np.testing.assert_array_equal(labels > 0, raw >= 128)
  # every section holds mitochondria, the 1-bit PNGs (sections 1 and 7) too
  assert all(0.02 < f < 0.1 for f in (labels > 0).mean(axis=(1, 2))), (labels > 0).mean((1, 2))
  # ids are the 6-connected components of the whole stack (scipy as reference)
  from scipy import ndimage
  reference, count = ndimage.label(raw >= 128)
  assert labels.max() == count and 20 < count < 400
  pairs = np.unique(np.stack([labels[labels > 0], reference[reference > 0]], 1), axis=0)
  assert len(pairs) == count


def test_decode_blocks_keep_the_mitochondria_whole(tmp_path, stack1_labels):
  """The config's decode.block_shape / halo cut no VNC III mitochondrion: on
  probability maps made from the 16 labelled sections, blockwise decoding
  flags no component and equals whole-volume decoding. (The 8 nm MitoEM
  defaults, 64x512x512 blocks with a 64 halo, flag 7 here.)"""
  probs = probabilities_from_labels(stack1_labels, seed=3, noise=0.1)
  settings = blockwise.DecodeSettings.from_config(vnc3.get_config("baseline").decode)
  whole = postprocess.decode_instances(
      probs[..., 0], probs[..., 1], seed_mask=settings.seed_mask,
      seed_contour=settings.seed_contour, foreground=settings.foreground,
      min_seed_size=settings.min_seed_size, min_size=settings.min_size)
  out, stats = blockwise.decode(sources.write_array(str(tmp_path / "p.zarr"), probs),
                                str(tmp_path / "out"), settings)
  assert stats["components_cut_by_halo"] == 0 and "halo_note" not in stats, stats
  assert stats["instances"] == whole.max() > 20
  assert same_up_to_relabelling(whole, out.read([0, 0, 0], out.shape))


def test_train_then_score_sections_12_to_15(tmp_path):
  shared_data("vnc3", "stack1")
  work = tmp_path / "run"
  flags = {"model.widths": "(4,4,6,6,8)", "train.steps": 2, "train.batch_size": 2,
           "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 0,
           "train.warmup_steps": 1, "data.patch_shape": "(4,64,64)",
           "infer.window": "(4,256,256)", "infer.overlap": 0.25, "infer.batch_size": 4,
           "decode.block_shape": "(4,512,512)", "decode.halo": "(0,64,64)"}
  # XLA's default optimisation, not the suite's -O0 (tests/conftest.py): this
  # run predicts 8x1024x1024 and is bound by running, not compiling (58 s
  # against 63 s at -O0); it is also the suite's end-to-end run as users compile
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(
      [sys.executable, "-m", "stt_jax.main", "--config=configs/vnc3.py:baseline",
       f"--workdir={work}", "--quiet", *[f"--config.{k}={v}" for k, v in flags.items()]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert "trained 2 steps" in out.stdout
  assert "(4, 1024, 1024)" in out.stdout  # the held-out sections 12-15
  scores = json.load(open(work / "eval.json"))
  assert tuple(scores["volume_shape"]) == (4, 1024, 1024)
  # predicted with sections 8-11 as context, sections 12-15 scored
  assert scores["context_offset"] == [4, 0, 0] and "raw[[8, 0, 0]:[16, 1024, 1024]]" in out.stdout
  for key in ("jaccard", "dice", "ap_75"):
    assert 0.0 <= scores[key] <= 1.0
  assert scores["num_gt"] > 10  # mitochondria of sections 12-15 with >= 500 voxels
  # recall at t = 0.05 can only fall as t grows
  recalls = [v["recall"] for v in scores["mask_threshold_sweep"].values()]
  assert recalls == sorted(recalls, reverse=True)
  # two steps cannot reach the seed threshold: said, with the highest mask
  # probability read back from the stored maps
  probs = sources.open_volume(str(work / "val_segmentation" / "probabilities.zarr"))
  highest = probs.read([0, 0, 0, 0], [*probs.shape[:3], 1]).max() / 255
  assert scores["max_mask_probability"] == pytest.approx(highest, abs=1e-4) and highest < 0.9
  assert scores["decode_note"].startswith("0 instances: no voxel's mask probability exceeds "
                                          "decode.seed_mask 0.90")
  assert scores["decode_note"] in out.stdout


def test_vnc3_compare_scores_a_run_and_finds_its_invented_object(stack1_labels, tmp_path,
                                                                  capsys):
  """bench/vnc3_compare.py on a run folder whose validation segmentation is
  the truth plus one object where there is none: its Jaccard and the error
  breakdown follow from the counts."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import vnc3_compare  # pylint: disable=g-import-not-at-top
  cfg = vnc3.get_config("baseline")
  [(_, labels, offset)] = datasets.open_validation_volumes(cfg)
  truth = stack1_labels[12:16]
  assert labels.shape[:3] == truth.shape
  # a 12x12 square in section 13 with no truth within 30 px in any section
  free = ~np.any(truth > 0, axis=0)
  y, x = next((y, x) for y in range(40, 980, 12) for x in range(40, 980, 12)
              if free[y - 30:y + 42, x - 30:x + 42].all())
  segmentation = np.zeros((offset[0] + 4, 1024, 1024), np.uint32)
  segmentation[offset[0]:] = truth
  segmentation[offset[0] + 1, y:y + 12, x:x + 12] = truth.max() + 1
  run = tmp_path / "run"
  sources.write_array(str(run / "val_segmentation" / "instances.zarr"), segmentation)
  vnc3_compare.main([f"fake={run}", f"--out={tmp_path / 'compare.json'}"])
  assert "100% in invented objects" in capsys.readouterr().out
  result = json.load(open(tmp_path / "compare.json"))["results"]["fake"]
  tp = int(np.count_nonzero(truth))
  assert result["jaccard"] == pytest.approx(tp / (tp + 144))
  errors = result["errors"]
  assert (errors["tp"], errors["fp"], errors["fn"]) == (tp, 144, 0)
  assert errors["fp_in_false_objects"] == 1.0 and errors["fp_by_distance"]["[16, inf)"] == 1.0
