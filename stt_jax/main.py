r"""stt_jax command line.

  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo --mode=evaluate
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo \
      --mode=segment --input=my_volume.zarr --output=runs/my_volume_seg
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo --mode=export

Any config field can be overridden: --config.train.steps=50.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "segment", "export"],
                          "What to do.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, outputs.")
_RESUME = flags.DEFINE_bool("resume", False, "train: continue the run in --workdir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing run folder or output.")
_INPUT = flags.DEFINE_string("input", None, "segment: image volume (zarr).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "segment: output folder; export: export folder.")
_WEIGHTS = flags.DEFINE_string("weights", None,
                               "segment/evaluate: an export folder to load instead "
                               "of the latest checkpoint in --workdir.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")


class _UsageError(Exception):
  pass


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with every failure turned into one line (no traceback)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    _fail(f"bad config override: {message}")
  except Exception as e:  # pylint: disable=broad-except
    # an error raised inside the config file's get_config()
    _fail(f"cannot load --config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/demo.py")
  path = getattr(flags.FLAGS["config"], "config_filename", None)
  if path and not os.path.isfile(path.split(":")[0]):
    _fail(f"--config file not found: {path}")
  try:
    _CONFIG.value.keys()
  except Exception as e:  # config_flags defers errors of loading the file
    _fail(f"cannot load --config {path}: {str(e).splitlines()[0]}")
  return rest


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _require(value, flag: str, mode: str):
  if not value:
    raise _UsageError(f"--{flag} is required with --mode={mode}")
  return value


def run(argv) -> None:
  if len(argv) > 1:
    raise _UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  # Heavy imports after flag parsing: --help and flag errors stay instant.
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  config_lib.validate(cfg)
  mode = _MODE.value
  workdir = _require(_WORKDIR.value, "workdir", mode)
  if mode == "train":
    _train(cfg, workdir)
  elif mode == "evaluate":
    _evaluate(cfg, workdir)
  elif mode == "segment":
    _segment(cfg, workdir)
  elif mode == "export":
    _export(cfg, workdir)


def _train(cfg, workdir: str) -> None:
  from stt_jax.train import loop  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  model, state, mesh = loop.train(cfg, workdir, resume=_RESUME.value,
                                  overwrite=_OVERWRITE.value, quiet=_QUIET.value)
  print(f"trained {int(state.step)} steps in {time.perf_counter() - t0:.0f} s "
        f"on {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)")
  _score_val(cfg, workdir, model, state.params, mesh)


def _load(cfg, workdir: str):
  """(cfg, model, params, mesh) from --weights (an export) or the run's latest
  checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  weights = _WEIGHTS.value
  if weights:
    if not checkpoint.is_export(weights):
      raise UserError(f"--weights {weights} is not an stt_jax export "
                      f"(no {checkpoint.EXPORT_MARKER}); make one with --mode=export")
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model = ml_collections.ConfigDict(checkpoint.read_export_model_config(weights))
  model, _, state, mesh = loop.build(cfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  if weights:
    params = checkpoint.load_export(weights, state.params)
  else:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise UserError(f"{workdir} holds no checkpoints; train first or pass --weights")
    ckpts = checkpoint.Checkpoints(ckpt_dir, save_every=1, keep=1_000_000)
    params = ckpts.restore(state).params
    ckpts.close()
  return cfg, model, params, mesh


def _score_val(cfg, workdir: str, model, params, mesh) -> None:
  from stt_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import pipeline, sliding_window  # pylint: disable=g-import-not-at-top
  from stt_jax.metrics import report  # pylint: disable=g-import-not-at-top
  if cfg.data.synthetic.enabled:
    datasets.ensure_synthetic(cfg, workdir)
  image, labels = datasets.open_split(cfg, "val")
  t0 = time.perf_counter()
  # derived output of this run folder: replaced on every evaluation
  out_dir = pipeline.prepare_output_dir(os.path.join(workdir, "val_segmentation"),
                                        overwrite=True)
  predict_fn = sliding_window.make_predict_fn(model, mesh)
  instances = pipeline.segment(cfg, predict_fn, params, image, mesh, out_dir)
  seconds = time.perf_counter() - t0
  gt = labels.read([0, 0, 0], labels.shape)
  scores = report.score(gt, instances, min_gt_size=cfg.eval.min_gt_size)
  scores["segment_seconds"] = seconds
  scores["volume_shape"] = list(image.shape)
  print(report.format_table(scores, f"held-out volume {image.path} {image.shape}"))
  print(f"segmented in {seconds:.1f} s; instances in {out_dir}")
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(scores, f, indent=2)


def _evaluate(cfg, workdir: str) -> None:
  cfg, model, params, mesh = _load(cfg, workdir)
  _score_val(cfg, workdir, model, params, mesh)


def _segment(cfg, workdir: str) -> None:
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import pipeline, sliding_window  # pylint: disable=g-import-not-at-top
  image_path = _require(_INPUT.value, "input", "segment")
  out = _require(_OUTPUT.value, "output", "segment")
  image = sources.open_volume(image_path)
  out_dir = pipeline.prepare_output_dir(out, overwrite=_OVERWRITE.value)
  cfg, model, params, mesh = _load(cfg, workdir)
  t0 = time.perf_counter()
  instances = pipeline.segment(cfg, sliding_window.make_predict_fn(model, mesh),
                               params, image, mesh, out_dir)
  print(f"segmented {image.shape} in {time.perf_counter() - t0:.1f} s: "
        f"{int(instances.max())} instances -> {out_dir}")


def _export(cfg, workdir: str) -> None:
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  out = _OUTPUT.value or os.path.join(workdir, "export")
  cfg, _, params, _ = _load(cfg, workdir)
  checkpoint.export_weights(out, params, cfg.model.to_dict(),
                            overwrite=_OVERWRITE.value)
  print(f"exported inference weights to {os.path.abspath(out)}")


def _main(argv) -> None:
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except (UserError, _UsageError) as e:
    _fail(str(e))


def cli() -> None:
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
