r"""stt_jax command line.

  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo --mode=evaluate
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo \
      --mode=segment --input=my_volume.zarr --output=runs/my_volume_seg
  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo --mode=export
  python -m stt_jax.main --config=configs/demo.py --mode=decode \
      --input=runs/my_volume_seg/probabilities.zarr --output=runs/redecoded
  python -m stt_jax.main --config=configs/demo.py --mode=evaluate \
      --input=runs/my_volume_seg/instances.zarr --labels=my_labels.zarr

Any config field can be overridden: --config.train.steps=50.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "evaluate", "segment", "decode", "export", "convert",
                           "pyramid"],
                          "What to do. segment: --input image -> --output folder "
                          "(probabilities, instances, morphology, previews). decode: "
                          "--input probabilities.zarr -> instances (no model). "
                          "evaluate: score the validation volume, or --input "
                          "instances against --labels. convert: copy --input (any "
                          "format) into a chunked zarr at --output. pyramid: --input "
                          "(instances or a uint8 image) -> a multiscale neuroglancer "
                          "precomputed folder at --output, or OME-Zarr 0.5 where "
                          "--output ends in .ome.zarr, for viewers.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, outputs.")
_RESUME = flags.DEFINE_bool("resume", False, "train: continue the run in --workdir.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at", None, "train: stop after this step, the schedule (train.steps) unchanged; "
    "its checkpoint is saved and --resume goes on from it.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing run folder or output.")
_INPUT = flags.DEFINE_string("input", None, "segment/convert: image volume (any format "
                             "of stt_jax.data.sources).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "segment: output folder; export: export folder; evaluate: "
                              "a new folder for eval.json and the validation "
                              "segmentation (default: the run folder's).")
_WEIGHTS = flags.DEFINE_string("weights", None,
                               "segment/evaluate/export: an export folder to load "
                               "instead of a checkpoint in --workdir.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "evaluate/segment/export from --workdir: its newest "
    "saved state (checkpoints/, or best/ where newer), its best state (best/, kept "
    "when train.eval_every > 0) or a step.")
_EMA = flags.DEFINE_bool(
    "ema", True, "evaluate/segment/export from --workdir, of a run trained with "
    "train.ema_decay > 0: its EMA weights; --noema: its live ones (to score both).")
_LABELS = flags.DEFINE_string("labels", None, "evaluate: ground-truth instance labels "
                              "to score --input (a segmentation) against.")
_COMPARE = flags.DEFINE_string(
    "compare", None, "evaluate --labels: a second segmentation of the same volume; "
    "prints Jaccard(--input) - Jaccard(--compare) with a paired tile-bootstrap "
    "interval (eval.json: compare).")
_IMAGE = flags.DEFINE_string("image", None, "decode: the EM volume, for preview PNGs.")
_REGION = flags.DEFINE_string(
    "region", None, "segment/convert/pyramid: only the box ((z0,y0,x0),(z1,y1,x1)) "
    "of --input (stops exclusive): outputs have its shape, count coordinates from "
    "its start (segment.json: input_region) and record where it lies "
    "(translation_nm), so viewers place it on the image. segment predicts it with "
    "the image around it, so its probabilities equal the whole volume's there.")
_PART = flags.DEFINE_string(
    "part", None, "segment: I/N, this process's share of the blocks when N "
    "processes (machines, array jobs) segment one --input into one --output on a "
    "shared filesystem, e.g. --part=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; "
    "the part that finds every block predicted decodes.")
_MESH_SCALE = flags.DEFINE_integer(
    "mesh_scale", None, "pyramid (instances): also write surface meshes of every "
    "id, from this scale of the pyramid (0 = full resolution, 1 = y/x halved: "
    "about a third of the triangles), for neuroglancer's 3D view, and each id's volume "
    "(segment properties) for its segment list.", lower_bound=0)
_INTENSITY_RANGE = flags.DEFINE_string(
    "intensity_range", None, "convert: rescale a 16-bit, signed or float image to "
    "the uint8 the model reads, 'low,high' -> 0..255 (clipped), or 'auto': the "
    "0.5th-99.5th percentiles of a sample of sections (printed, to reuse).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process JAX: 'auto' joins when --coordinator_address, "
    "JAX_COORDINATOR_ADDRESS or a multi-task SLURM job says so; 'on' always "
    "calls jax.distributed.initialize() (cluster auto-detection: SLURM, TPU pods).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class _UsageError(Exception):
  pass


def _last_override_wins(argv: list[str]) -> list[str]:
  """`argv` with only the last of each repeated `--config.<key>` override.
  absl keeps a repeated flag's last value, but ml_collections joins repeated
  tuple overrides into one longer tuple (`--config.infer.window=(4,32,32)`
  twice reads as (4, 32, 32, 4, 32, 32)); a script that appends an override
  to its defaults means the last one. The space-separated form
  (`--config.infer.window "(4,32,32)"`) is joined into `key=value` first: a
  value can only follow a non-boolean key, since main takes no positional
  arguments."""
  joined, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if (arg.startswith("--config.") and "=" not in arg and i + 1 < len(argv)
        and not argv[i + 1].startswith("--")):
      joined.append(f"{arg}={argv[i + 1]}")
      i += 2
    else:
      joined.append(arg)
      i += 1
  key = lambda arg: arg.split("=", 1)[0] if arg.startswith("--config.") and "=" in arg else None
  last = {key(arg): i for i, arg in enumerate(joined) if key(arg)}
  return [arg for i, arg in enumerate(joined) if not key(arg) or last[key(arg)] == i]


def _exception_text(error: BaseException) -> str:
  """The innermost message on one line (ml_collections wraps a KeyError in an AttributeError)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return " ".join(text.split())


def _unknown_field_text(argv: list[str], dotted: str) -> str | None:
  """"config.<group> has no field 'x'; its fields: ..." for an override path
  that leaves the config, or None where the config cannot be loaded again.
  ml_collections names only the missing part ('optim'), with a suggestion
  only when one is close; the list of what is there says what to type."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return None
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    node = config_lib.load_file(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # the original message stands
  where = "config"
  for part in dotted.split("."):
    if not hasattr(node, "keys"):
      return f"{where} is a value, not a group of fields"
    if part not in node:
      return f"{where} has no field '{part}'; its fields: {', '.join(sorted(node.keys()))}"
    node, where = node[part], f"{where}.{part}"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with every failure turned into one line (no traceback)."""
  try:
    rest = flags.FLAGS(_last_override_wins(argv))
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    text = _exception_text(e)
    # name the override whose path has the unknown field ("'stepz' Did you mean ...")
    field = re.match(r"'([^']+)'", text)
    culprit = [a.split("=", 1)[0] for a in argv if field and a.startswith("--config.")
               and field.group(1) in a.split("=", 1)[0].split(".")]
    if culprit and "Did you mean" not in text:
      text = _unknown_field_text(argv, culprit[0][len("--config."):]) or text
    _fail(f"bad config override{' ' + culprit[0] if culprit else ''}: {text}")
  except Exception as e:  # pylint: disable=broad-except
    # an error raised inside the config file's get_config()
    from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    first_line = str(e).splitlines()[0] if str(e) else ""
    # our own UserError already says what to fix; a bug in a config file names its type
    _fail(f"cannot load --config: {first_line}" if isinstance(e, UserError)
          else f"cannot load --config: {type(e).__name__}: {first_line}")
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


def _open_volume(flag: str, path: str):
  """sources.open_volume, its one-line error naming the flag that gave the path."""
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    return sources.open_volume(path)
  except UserError as e:
    raise UserError(f"--{flag}: {e}") from None


def _input_volume(mode: str):
  """--input (for pyramid, a segment output folder means its instances), or
  its --region box."""
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  path = _require(_INPUT.value, "input", mode)
  volume = _open_volume("input", _segmentation_path(path) if mode == "pyramid" else path)
  if _REGION.value is None:
    return volume
  try:
    start, stop = ast.literal_eval(_REGION.value)
    start, stop = [int(v) for v in start], [int(v) for v in stop]
  except (ValueError, TypeError, SyntaxError):
    raise UserError(f"--region={_REGION.value!r}: give ((z0,y0,x0),(z1,y1,x1)), "
                    "e.g. --region=\"((0,0,0),(64,1024,1024))\"") from None
  try:
    return sources.RegionVolume(volume, start, stop)
  except UserError as e:
    raise UserError(f"--region: {e}") from None


def _part() -> tuple[int, int]:
  """(i, n) of --part=i/n; (0, 1) without it."""
  if _PART.value is None:
    return 0, 1
  try:
    index, count = (int(v) for v in _PART.value.split("/"))
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise _UsageError(f"--part={_PART.value}: give I/N with 0 <= I < N, e.g. --part=0/4")
  if count > 1 and _OVERWRITE.value:
    raise _UsageError("--overwrite with --part would let one part delete the others' "
                      "work: remove the output folder first, or choose another --output")
  return index, count


def _is_main_process() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def _join_distributed() -> None:
  """jax.distributed.initialize from flags or the environment (before any
  other JAX call)."""
  mode = _DISTRIBUTED.value
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  wanted = mode == "on" or (mode == "auto" and (
      _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
      or slurm_tasks > 1))
  if not wanted:
    return
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  except (RuntimeError, ValueError) as e:
    raise _UsageError("jax.distributed.initialize failed: "
                      f"{str(e).splitlines()[0]}; check --coordinator_address, "
                      "--num_processes and --process_id") from e


def run(argv) -> None:
  if len(argv) > 1:
    raise _UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  # Heavy imports after flag parsing: --help and flag errors stay instant.
  from stt_jax import backend  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  backend.configure(cfg.backend)  # before any backend starts
  _join_distributed()
  backend.start(cfg.backend)
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(cfg)
  mode = _MODE.value
  if _CHECKPOINT.value not in ("latest", "best") and not _CHECKPOINT.value.isdigit():
    raise _UsageError(f"--checkpoint={_CHECKPOINT.value}: give latest, best or a step number")
  if _CHECKPOINT.value != "latest" and (mode not in ("evaluate", "segment", "export")
                                        or _WEIGHTS.value or _LABELS.value):
    raise _UsageError(f"--checkpoint picks the state of a run folder (--workdir) to "
                      f"evaluate, segment or export; it does nothing with --mode={mode}"
                      + (" and --weights (an export holds one state)" if _WEIGHTS.value
                         else " and --labels" if _LABELS.value else ""))
  if _REGION.value is not None and mode not in ("segment", "convert", "pyramid"):
    raise _UsageError(f"--region picks a box of --input to segment, convert or pyramid; it "
                      f"does nothing with --mode={mode}")
  if _STOP_AT.value is not None and mode != "train":
    raise _UsageError(f"--stop_at ends a training run early; it does nothing with --mode={mode}")
  if _STOP_AT.value is not None and not 1 <= _STOP_AT.value <= cfg.train.steps:
    raise _UsageError(f"--stop_at={_STOP_AT.value}: give a step from 1 to train.steps "
                      f"({cfg.train.steps})")
  if _PART.value is not None and mode != "segment":
    raise _UsageError(f"--part splits --mode=segment over processes; it does nothing "
                      f"with --mode={mode}")
  if mode == "segment" and _process_count() > 1:
    raise _UsageError("--mode=segment runs as independent processes, one per part "
                      "(each uses its machine's devices): start them without "
                      "jax.distributed and give each --part=I/N")
  if _COMPARE.value is not None and not (mode == "evaluate" and _LABELS.value):
    raise _UsageError("--compare scores a second segmentation with --mode=evaluate "
                      f"--labels; it does nothing with --mode={mode}"
                      + ("" if mode != "evaluate" else " without --labels"))
  if _MESH_SCALE.value is not None and mode != "pyramid":
    raise _UsageError(f"--mesh_scale adds meshes to --mode=pyramid; it does nothing "
                      f"with --mode={mode}")
  if _INTENSITY_RANGE.value is not None and mode != "convert":
    raise _UsageError(f"--intensity_range rescales an image with --mode=convert; it "
                      f"does nothing with --mode={mode}")
  if mode in ("train", "evaluate", "segment", "export") and _is_main_process():
    model_parallel = int(cfg.train.model_parallel) if mode == "train" else 1
    from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
    mesh = step_lib.make_mesh(model_parallel=model_parallel)
    print(backend.describe(mesh), flush=True)
    for note in backend.attention_notes(cfg.model.attention.implementation, mesh):
      print(note, flush=True)
  if mode == "convert":
    _convert(cfg)
    return
  if mode == "decode":
    _decode(cfg)
    return
  if mode == "pyramid":
    _pyramid(cfg)
    return
  if mode == "evaluate" and _LABELS.value:
    _evaluate_volumes(cfg)
    return
  if mode in ("segment", "export") and _WEIGHTS.value:
    workdir = _WORKDIR.value  # an export holds everything these modes need
    if mode == "export" and not workdir:
      _require(_OUTPUT.value, "output", "export --weights")
  elif mode == "segment" and not _WORKDIR.value:
    raise _UsageError("--mode=segment needs --workdir (a run folder) or --weights (an export)")
  elif mode == "evaluate" and not _WORKDIR.value:
    if not (_WEIGHTS.value and _OUTPUT.value):
      raise _UsageError("--mode=evaluate needs --workdir (a run folder), or --weights (an "
                        "export) with --output (a folder for its scores)")
    workdir = None  # an export scored into --output
  else:
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
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax.train import loop  # pylint: disable=g-import-not-at-top
  main_process = _is_main_process()
  if main_process:
    _print_window_note(cfg, None)  # validation infers on infer.window
    if _RESUME.value:
      _print_schedule_note(cfg, workdir)
  t0 = time.perf_counter()
  result = loop.train(cfg, workdir, resume=_RESUME.value,
                      overwrite=_OVERWRITE.value, quiet=_QUIET.value, stop_at=_STOP_AT.value)
  from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  step = int(step_lib.to_host(result.state.step))
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if result.stopped_by == "stop_at":  # as asked: not an error, and not scored here
    if main_process:
      print(f"stopped at step {step} of {cfg.train.steps} (--stop_at) in "
            f"{time.perf_counter() - t0:.0f} s; checkpoint saved in {ckpt_dir}; continue "
            "with --resume")
      _print_best(cfg, workdir, result.best)
    return
  if result.stopped_by:
    if main_process:
      print(f"stopped by {result.stopped_by} at step {step}; checkpoint saved in "
            f"{ckpt_dir}; continue with --resume", file=sys.stderr)
    sys.exit(143 if result.stopped_by == "SIGTERM" else 130)
  if main_process:
    mesh = result.mesh
    print(f"trained {step} steps in {time.perf_counter() - t0:.0f} s on "
          f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s), "
          f"mesh {dict(mesh.shape)}")
    _print_best(cfg, workdir, result.best)
  if jax.process_count() > 1:
    if main_process:
      print("multi-process run: score it with --mode=evaluate from one process")
    return
  _score_val(cfg, workdir, result.model, result.state.inference_params(), result.mesh,
             validation=result.final_validation,
             weights=f"the trained state, step {step}, of {os.path.abspath(workdir)}")


def _print_best(cfg, workdir: str, best: dict | None) -> None:
  if best:
    print(f"best validation {cfg.train.best_metric} {best[cfg.train.best_metric]:.4f}"
          f" at step {best['step']} (saved in {os.path.abspath(workdir)}/best)")


def _chosen_state(workdir: str) -> tuple[str, int]:
  """(checkpoint folder, step) of the state --checkpoint names in `workdir`."""
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  which = _CHECKPOINT.value  # its form was checked in run()
  if which == "best":
    directory = os.path.abspath(os.path.join(workdir, "best"))
    steps = checkpoint.saved_steps(directory)
    if not steps:
      raise _UsageError(f"--checkpoint=best: {workdir} kept no best state (training "
                        "keeps one when it validates, --config.train.eval_every > 0); "
                        "use --checkpoint=latest or a step")
    return directory, steps[-1]
  held = checkpoint.saved_states(workdir)  # best/ may be newer: see --resume
  if not held:
    raise _UsageError(f"{workdir} holds no checkpoints; train first or pass --weights")
  step = int(which) if which.isdigit() else max(held)
  if step not in held:
    raise _UsageError(f"--checkpoint={which}: {workdir} holds steps "
                      f"{', '.join(map(str, sorted(held)))}; pick one, best or latest")
  return held[step], step


def _print_schedule_note(cfg, workdir: str) -> None:
  """Says when a resume changes train.steps under a decaying schedule: the
  decay is a function of train.steps, so the learning rate jumps."""
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    started = checkpoint.read_run_config(workdir)["train"]["steps"]
  except (OSError, KeyError, ValueError):
    return  # no run to resume: loop.train says so
  if cfg.train.schedule != "constant" and int(started) != int(cfg.train.steps):
    print(f"note: this run started with train.steps={started}; its {cfg.train.schedule} "
          f"learning rate now decays over {cfg.train.steps} steps, so it jumps at this "
          f"resume (a run asked for {cfg.train.steps} steps from the start differs)")


def _load(cfg, workdir: str | None):
  """(cfg, model, params, mesh, what) from --weights (an export) or the run's
  state that --checkpoint names; `what` says which weights they are."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  weights = _WEIGHTS.value
  if weights and not _EMA.value:
    raise UserError("--noema chooses between a run's EMA and live weights; an export "
                    "(--weights) holds one set: drop --noema or load the run (--workdir)")
  if weights:
    if not checkpoint.is_export(weights):
      raise UserError(f"--weights {weights} is not an stt_jax export "
                      f"(no {checkpoint.EXPORT_MARKER}); make one with --mode=export")
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model = ml_collections.ConfigDict(checkpoint.read_export_model_config(weights))
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if weights:  # an export: generator weights only, no training state built
    model = unet.from_config(cfg.model)
    mesh = step_lib.make_mesh()
    params = checkpoint.load_export(weights, model, tuple(cfg.data.patch_shape), mesh)
    return cfg, model, params, mesh, f"export {os.path.abspath(weights)}"
  directory, step = _chosen_state(workdir)
  checkpoint.check_resumable(workdir, cfg.to_json_best_effort())
  setup = loop.build(cfg)
  state = checkpoint.restore_from(directory, setup.state, step)
  ema = _uses_ema(cfg)
  kind = "EMA weights" if ema else "live weights" if cfg.train.ema_decay > 0 else "weights"
  what = f"{os.path.basename(directory)}/{step} of {os.path.abspath(workdir)} ({kind})"
  return cfg, setup.model, state.inference_params() if ema else state.params, setup.mesh, what


def _uses_ema(cfg) -> bool:
  """Whether the weights loaded from a run are its EMA (kept, and not --noema)."""
  return cfg.train.ema_decay > 0 and _EMA.value


def _score_val(cfg, workdir: str, model, params, mesh, validation=None, *,
               weights: str, output: str | None = None) -> None:
  """Scores `params` (described by `weights`) on data.val (or reports
  `validation`, the loop's result for these same weights), prints the table
  and writes eval.json, with the segmentation, in `output` (default: workdir)."""
  output = output or workdir
  from stt_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import sliding_window  # pylint: disable=g-import-not-at-top
  from stt_jax.metrics import report  # pylint: disable=g-import-not-at-top
  from stt_jax.train import loop  # pylint: disable=g-import-not-at-top
  if cfg.data.synthetic.enabled:
    datasets.ensure_synthetic(cfg, workdir)
  if validation is None:
    validation = loop.validate(cfg, output,
                               sliding_window.make_predict_fn(model, mesh, cfg.infer.tta),
                               params, mesh)
  scores, path, out_dir = validation
  volumes = scores.get("per_volume")
  title = (f"{len(volumes)} held-out volumes, scored as one set" if volumes
           else f"held-out volume {path} {tuple(scores['volume_shape'])}")
  print(report.format_table(scores, title))
  if volumes:
    print(report.format_volume_rows(volumes))
  print(f"segmented in {scores['segment_seconds']:.1f} s; instances in {out_dir}"
        + (f" and {len(volumes) - 1} more beside it (val_segmentation_more<i>)"
           if volumes else ""))
  if scores.get("decode_note"):
    print(scores["decode_note"])
  at = scores["mask_threshold_sweep"].get(f"{cfg.decode.foreground:.2f}")
  print(f"voxel Jaccard of mask > t: best {scores['best_mask_threshold_jaccard']:.4f} at "
        f"t = {scores['best_mask_threshold']:.2f}"
        + (f", {at['jaccard']:.4f} at decode.foreground = {cfg.decode.foreground:.2f}"
           if at else "") + " (eval.json: mask_threshold_sweep)")
  if "object_mean_mask_sweep" in scores:
    print(report.format_object_sweep(scores, cfg.decode.min_mean_mask))
  with open(os.path.join(output, "eval.json"), "w") as f:
    json.dump(dict(scores, weights=weights), f, indent=2)


def _print_window_note(cfg, source: str | None) -> None:
  """Says when a GroupNorm model infers on windows of another shape than it
  trained on (`source`: its run folder or export; None: cfg's own patch)."""
  from stt_jax.infer import sliding_window  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  patch = checkpoint.training_patch_shape(source) if source else tuple(cfg.data.patch_shape)
  note = sliding_window.group_norm_window_note(cfg.model.norm, patch, cfg.infer.window)
  if note:
    print(note)


def _evaluate(cfg, workdir: str | None) -> None:
  """Scores data.val into the run folder, or with --output into a new folder: a
  variant (another threshold, test-time augmentation) beside the run's own."""
  from stt_jax import paths  # pylint: disable=g-import-not-at-top
  if _OUTPUT.value and not _OVERWRITE.value:  # refuse it before the model loads
    paths.clear_for_output(_OUTPUT.value, overwrite=False)
  cfg, model, params, mesh, what = _load(cfg, workdir)
  print(f"weights: {what}")
  _print_window_note(cfg, _WEIGHTS.value or workdir)
  output = None
  if _OUTPUT.value:
    output = paths.clear_for_output(_OUTPUT.value, overwrite=_OVERWRITE.value)
    os.makedirs(output)
  _score_val(cfg, workdir or output, model, params, mesh, weights=what, output=output)
  if output:
    print(f"scores written to {os.path.join(output, 'eval.json')}")


def _segment(cfg, workdir: str | None) -> None:
  from stt_jax.data import datasets, sources  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import blocks, pipeline, preview, sliding_window  # pylint: disable=g-import-not-at-top
  part = _part()
  image = _input_volume("segment")
  datasets.check_image(image, "--input")
  preview.check_sections(cfg.infer.preview_sections, image.shape[0])  # before the work
  out = os.path.abspath(_require(_OUTPUT.value, "output", "segment"))
  blocks.check_output(out, overwrite=_OVERWRITE.value)  # before the model loads
  cfg, model, params, mesh, what = _load(cfg, workdir)
  print(f"weights: {what}")
  _print_window_note(cfg, _WEIGHTS.value or workdir)
  t0 = time.perf_counter()
  summary = pipeline.segment(cfg, sliding_window.make_predict_fn(model, mesh, cfg.infer.tta),
                             params, image, mesh, out, overwrite=_OVERWRITE.value,
                             quiet=_QUIET.value, sections=cfg.infer.preview_sections,
                             region_context=True, part=part)
  seconds = time.perf_counter() - t0
  if part[1] > 1 and "instances" not in summary:
    left = summary["blocks_left"]
    print(f"part {part[0]}/{part[1]}: predicted {summary['predicted_blocks']} blocks in "
          f"{seconds:.1f} s; " + (f"{left} blocks of other parts still to predict (the "
                                  "part that finishes last decodes)" if left else
                                  "another part decodes (or has decoded)") + f" -> {out}")
    return
  voxels = int(np.prod(image.shape))
  _, region = sources.file_and_box(image)
  box = f" (the box {region[0]}..{region[1]} of --input)" if region else ""
  if part[1] > 1:  # this process's time covers its blocks and the decoding only
    print(f"part {part[0]}/{part[1]}: predicted {summary['predicted_blocks']} blocks; with "
          f"every part's blocks done it decoded {image.shape}{box}, in {seconds:.1f} s: "
          f"{summary['instances']} instances -> {out}")
  else:
    print(f"segmented {image.shape}{box} in {seconds:.1f} s ({voxels / seconds:.3g} voxels/s"
          f"{', continued a previous run' if summary['resumed'] else ''}): "
          f"{summary['instances']} instances -> {out}")
  _print_decode_notes(summary)


def _print_decode_notes(stats: dict) -> None:
  """What `blockwise.decode` noted: 0 instances (which step lost them), and
  components a halo cut."""
  for key in ("decode_note", "halo_note"):
    if key in stats:
      print(stats[key])


def _decode(cfg) -> None:
  from stt_jax.data import rescaled  # pylint: disable=g-import-not-at-top
  from stt_jax.infer import blocks, pipeline  # pylint: disable=g-import-not-at-top
  # a binned model's probabilities decode at the voxels of the image it read
  probabilities = rescaled.full_resolution(
      _open_volume("input", _require(_INPUT.value, "input", "decode")))
  if len(probabilities.shape) != 4 or probabilities.shape[3] < 2 or \
      probabilities.dtype != np.uint8:
    raise _UsageError(f"--input {probabilities.path} must be uint8 probabilities "
                      "[z, y, x, channels >= 2] (a segment run's probabilities.zarr), got "
                      f"{probabilities.dtype} {probabilities.shape}")
  out = os.path.abspath(_require(_OUTPUT.value, "output", "decode"))
  image = _open_volume("image", _IMAGE.value) if _IMAGE.value else None
  if image is not None and image.shape != probabilities.shape[:3]:
    raise _UsageError(f"--image {image.shape} and --input {probabilities.shape[:3]} "
                      "differ in shape")
  if image is not None:
    from stt_jax.infer import preview  # pylint: disable=g-import-not-at-top
    preview.check_sections(cfg.infer.preview_sections, image.shape[0])  # before the work
  resumed = blocks.open_output(out, {"input": os.path.abspath(probabilities.path),
                                     "decode": cfg.decode.to_dict()}, _OVERWRITE.value)
  voxel_size = probabilities.voxel_size_nm or tuple(cfg.data.voxel_size_nm)
  t0 = time.perf_counter()
  instances, stats = pipeline.decode(cfg, probabilities, out, voxel_size_nm=voxel_size,
                                     quiet=_QUIET.value)
  seconds = time.perf_counter() - t0
  from stt_jax.metrics import morphology  # pylint: disable=g-import-not-at-top
  summary = {**stats, "decode_seconds": seconds, "resumed": resumed,
             "morphology": morphology.write_report(instances, voxel_size, out,
                                                   tuple(cfg.decode.block_shape))}
  if image is not None:
    summary["previews"] = preview.write_previews(image, instances, out,
                                                 cfg.infer.preview_sections)
  blocks.finish_output(out, summary)
  voxels = int(np.prod(probabilities.shape[:3]))
  print(f"decoded {probabilities.shape[:3]} in {seconds:.1f} s ({voxels / seconds:.3g} "
        f"voxels/s): {stats['instances']} instances -> {instances.path}")
  _print_decode_notes(stats)


def _segmentation_path(path: str) -> str:
  """A segment output folder's instances.zarr, or `path` itself."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "instances.zarr")):
    return os.path.join(path, "instances.zarr")
  return path


def _evaluate_volumes(cfg) -> None:
  from stt_jax.metrics import report, uncertainty  # pylint: disable=g-import-not-at-top
  path = _segmentation_path(_require(_INPUT.value, "input", "evaluate --labels"))
  instances = _open_volume("input", path)
  labels = _open_volume("labels", _LABELS.value)
  other = (_open_volume("compare", _segmentation_path(_COMPARE.value))
           if _COMPARE.value else None)
  if other is not None and other.shape[:3] != labels.shape[:3]:
    raise _UsageError(f"--compare {other.path} has shape {other.shape[:3]}, the labels "
                      f"{labels.shape[:3]}: compare segmentations of the same volume")
  for flag, volume in (("input", instances), ("labels", labels), ("compare", other)):
    if volume is None:
      continue
    if volume.dtype.kind not in "ui":
      raise _UsageError(f"--{flag} {volume.path} has dtype {volume.dtype}; scoring needs "
                        "integer instance ids (0 = background)")
  t0 = time.perf_counter()
  scores = report.score_volumes(labels, instances, min_gt_size=cfg.eval.min_gt_size,
                                block=tuple(cfg.decode.block_shape),
                                unlabelled_id=cfg.data.unlabelled_id)
  scores["seconds"] = time.perf_counter() - t0
  print(report.format_table(scores, f"{instances.path} vs {labels.path} {labels.shape}"))
  if other is not None:
    scores["compare"] = dict(report.compare(labels, instances, other,
                                            block=tuple(cfg.decode.block_shape),
                                            unlabelled_id=cfg.data.unlabelled_id,
                                            min_gt_size=cfg.eval.min_gt_size),
                             a=instances.path, b=other.path)
    print(uncertainty.format_difference(scores["compare"], "--input", "--compare"))
    print(uncertainty.format_ap_difference(scores["compare"], "--input", "--compare"))
  out = _OUTPUT.value or os.path.join(os.path.dirname(os.path.abspath(path)), "eval.json")
  if os.path.exists(out) and not _OVERWRITE.value:
    raise _UsageError(f"{out} exists; pass --overwrite or another --output")
  with open(out, "w") as f:
    json.dump(scores, f, indent=2)
  print(f"scores written to {out}")


def _export(cfg, workdir: str) -> None:
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  out = _OUTPUT.value or os.path.join(workdir, "export")
  cfg, _, params, _, what = _load(cfg, workdir)
  source = _WEIGHTS.value or workdir
  if _WEIGHTS.value:  # an export exported again keeps what its weights are
    weights = checkpoint.read_export_info(source).get("weights", "unknown")
  else:
    weights = "ema" if _uses_ema(cfg) else "live"
  checkpoint.export_weights(out, params, cfg.model.to_dict(),
                            overwrite=_OVERWRITE.value,
                            info={"weights": weights,
                                  "source": os.path.abspath(source), "from": what,
                                  "training_patch_shape": checkpoint.training_patch_shape(source)})
  print(f"exported inference weights ({what}) to {os.path.abspath(out)}")


def _convert(cfg) -> None:
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  from stt_jax import paths  # pylint: disable=g-import-not-at-top
  from stt_jax.data import intensity  # pylint: disable=g-import-not-at-top
  source = _input_volume("convert")
  out = _require(_OUTPUT.value, "output", "convert")
  value_range = None
  if _INTENSITY_RANGE.value is not None:
    if not _OVERWRITE.value:  # refuse an existing output before sampling, not after
      paths.clear_for_output(out, overwrite=False)
    value_range = intensity.parse_range(_INTENSITY_RANGE.value)
    if value_range is None:
      value_range, sampled = intensity.sample_range(source)
      print(f"intensity range {value_range[0]:g},{value_range[1]:g} ({sampled}); "
            f"convert other volumes of this data with --intensity_range="
            f"{value_range[0]:g},{value_range[1]:g}")
  t0 = time.perf_counter()
  volume = sources.convert_to_zarr(
      source, out, voxel_size_nm=source.voxel_size_nm or tuple(cfg.data.voxel_size_nm),
      overwrite=_OVERWRITE.value, intensity_range=value_range)
  mapped = (f", {value_range[0]:g}..{value_range[1]:g} -> uint8 0..255"
            if value_range else "")
  print(f"converted {source.path} {source.shape} {source.dtype} to {volume.path}"
        f"{mapped} in {time.perf_counter() - t0:.1f} s")
  if value_range is None and source.dtype != np.uint8:
    print(f"note: kept {source.dtype}; if this is an image (not labels), the model "
          "reads uint8: convert again with --intensity_range=auto (or low,high)")


def _pyramid(cfg) -> None:
  from stt_jax.data import pyramid  # pylint: disable=g-import-not-at-top
  from stt_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = _input_volume("pyramid")
  out = _require(_OUTPUT.value, "output", "pyramid")
  voxel_size = source.voxel_size_nm or tuple(cfg.data.voxel_size_nm)
  translation = sources.world_translation_nm(source, voxel_size)
  t0 = time.perf_counter()
  info = pyramid.write_pyramid(source, out, voxel_size_nm=voxel_size,
                               translation_nm=translation, overwrite=_OVERWRITE.value,
                               mesh_scale=_MESH_SCALE.value)
  if any(translation):
    print("placed at z, y, x = " + ", ".join(f"{t:g}" for t in info["translation_nm"])
          + " nm, where --input lies"
          + ("" if np.allclose(info["translation_nm"], translation) else
             f" (precomputed holds whole voxels: {', '.join(f'{t:g}' for t in translation)}"
             " rounded; an .ome.zarr output keeps it exactly)"))
  scales = ", ".join("x".join(str(n) for n in s["shape_zyx"]) for s in info["scales"])
  if "meshes" in info:
    m = info["meshes"]
    print(f"meshes of {m['objects']} objects from scale {m['scale']}: {m['triangles']} "
          f"triangles in {m['fragments']} fragments; segment properties: volume_um3"
          + (f"; {m['without_mesh']} ids vanish at that scale and have none "
             "(--mesh_scale=0 meshes every id)" if m["without_mesh"] else ""))
  name = os.path.basename(os.path.abspath(out))
  if info.get("format", "").startswith("OME-Zarr"):
    what = "labels" if info["type"] == "segmentation" else "image"
    print(f"wrote {os.path.abspath(out)}: {info['format']} {what} ({info['data_type']}), "
          f"{len(info['scales'])} scales (z x y x x: {scales}) in "
          f"{time.perf_counter() - t0:.1f} s; napari opens it with the napari-ome-zarr "
          f"plugin, neuroglancer as zarr3://http://<host>/{name}")
    return
  print(f"wrote {os.path.abspath(out)}: neuroglancer precomputed {info['type']} "
        f"({info['data_type']}), {len(info['scales'])} scales (z x y x x: {scales}) in "
        f"{time.perf_counter() - t0:.1f} s; serve its parent folder over HTTP and open "
        f"precomputed://http://<host>/{name} in neuroglancer")


def _out_of_memory_hint(mode: str) -> str:
  from stt_jax import errors  # pylint: disable=g-import-not-at-top
  return {
      "train": f"{errors.LOWER_TRAINING_MEMORY}, or infer.batch_size / "
               "infer.block_shape if it ran out validating",
      "evaluate": errors.LOWER_INFERENCE_MEMORY,
      "segment": f"{errors.LOWER_INFERENCE_MEMORY}; finished blocks are kept, "
                 "the same command continues",
  }.get(mode, "use smaller blocks or batches")


def _main(argv) -> None:
  from stt_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except (errors.UserError, _UsageError) as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if not errors.is_out_of_memory(e):
      raise  # a bug: its traceback is what a report needs
    mode = _MODE.value
    hint = _out_of_memory_hint(mode)
    _fail(f"out of device memory in --mode={mode}: {hint} ({errors.first_line(e)})")


def cli() -> None:
  from stt_jax import memory_use  # pylint: disable=g-import-not-at-top
  memory_use.restart_with_hugepages()  # first: a restart repeats what came before
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
