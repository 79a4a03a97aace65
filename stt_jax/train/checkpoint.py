"""Orbax checkpoints of the train state, exported inference weights, and the
guard that keeps one run from silently writing over another.

A run folder holds `checkpoints/` (the last `keep` states, saved every
`save_every` steps, asynchronously, and at the end or on SIGTERM/SIGINT) and,
when validation runs during training, `best/` (the state with the best
validation metric so far). Both hold whole train states: either can resume.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from stt_jax import paths
from stt_jax.errors import UserError

RUN_MARKER = "stt_jax_run.json"
EXPORT_MARKER = "stt_jax_export.json"


# how the model is computed, not what it is: a run may resume under others
# (deform_sorted_gradient: sessions 34-35's form of deform_gradient)
EXECUTION_KEYS = ("model.compute_dtype", "model.conv_impl", "model.attention.implementation",
                  "model.attention.temporal_implementation", "model.attention.chunks",
                  "model.attention.deform_gradient", "model.attention.deform_sorted_gradient")
# keys added after runs and exports were made: one without the key had this value
_ADDED_LATER = {"model.outputs": ["mask", "contour"], "model.norm": "none",
                "model.norm_groups": 4, "model.attention.chunks": 1,
                "model.attention.temporal_implementation": "auto",  # session 35
                "model.attention.deform_gradient": "scatter",        # session 36
                "model.input_scale": [1, 1, 1]}                      # session 42


def _with_keys_added_later(model: dict) -> dict:
  """`model` (a saved model config) with the keys it predates at their old
  values, so readers need no fallbacks of their own."""
  model = json.loads(json.dumps(model))  # a deep copy
  attention = model.get("attention")
  if isinstance(attention, dict) and "deform_sorted_gradient" in attention:
    # sessions 34-35 saved the one alternative order as a bool
    sort = attention.pop("deform_sorted_gradient")
    attention.setdefault("deform_gradient", "sorted" if sort else "scatter")
  for key, value in _ADDED_LATER.items():
    *parents, name = key.split(".")[1:]
    node = model
    for part in parents:
      node = node.get(part)
      if not isinstance(node, dict):
        break
    else:
      node.setdefault(name, value)
  return model


def _model_differences(old: dict, new: dict, prefix: str = "model") -> list[str]:
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    if f"{prefix}.{k}" in EXECUTION_KEYS:
      continue
    a, b = old.get(k, _ADDED_LATER.get(f"{prefix}.{k}")), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _model_differences(a, b, f"{prefix}.{k}")
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f"{prefix}.{k}: run has {a!r}, config has {b!r}")
  return out


def read_run_config(workdir: str) -> dict:
  """The config a run folder was started with (its stt_jax_run.json)."""
  with open(os.path.join(os.path.abspath(workdir), RUN_MARKER)) as f:
    return json.load(f)


def check_resumable(workdir: str, config_json: str) -> None:
  """Refuses to resume a run whose model (or adversarial/EMA/weight-decay
  switches, which change the saved state) differs from the current config's."""
  old = read_run_config(workdir)
  new = json.loads(config_json)
  diffs = _model_differences(old.get("model", {}), new.get("model", {}))
  for key in ("loss.adversarial_weight", "train.ema_decay", "train.weight_decay"):
    section, name = key.split(".")
    a = old.get(section, {}).get(name, 0.0)
    b = new.get(section, {}).get(name, 0.0)
    if (a > 0) != (b > 0):
      diffs.append(f"{key}: run has {a!r}, config has {b!r}")
  if diffs:
    raise UserError(f"cannot resume {workdir}: its state was made by another "
                    f"configuration ({diffs[0]}); use the run's config or a new --workdir")


def prepare_workdir(workdir: str, config_json: str, *, resume: bool,
                    overwrite: bool) -> None:
  """Makes `workdir` ready for training.

  An existing run folder is refused unless --resume (continue it) or
  --overwrite (delete it and start over) is given; a non-empty folder that is
  not a stt_jax run is never deleted.
  """
  workdir = os.path.abspath(workdir)
  marker = os.path.join(workdir, RUN_MARKER)
  has_run = os.path.exists(marker)
  non_empty = os.path.isdir(workdir) and bool(os.listdir(workdir))
  if resume and overwrite:
    raise UserError("--resume and --overwrite exclude each other; pick one")
  if non_empty and not has_run:
    raise UserError(f"{workdir} is not empty and holds no stt_jax run; "
                    "choose another --workdir")
  if has_run and not (resume or overwrite):
    raise UserError(f"{workdir} already holds a run; pass --resume to continue "
                    "it or --overwrite to delete it and start over")
  if has_run and overwrite:
    shutil.rmtree(workdir)
  if resume and not has_run:
    raise UserError(f"--resume given but {workdir} holds no run to resume")
  if resume:
    check_resumable(workdir, config_json)
  os.makedirs(workdir, exist_ok=True)
  if not has_run or overwrite:
    with open(marker, "w") as f:
      f.write(config_json)


def saved_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, ascending ([] if
  it does not exist)."""
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    return sorted(int(s) for s in manager.all_steps())
  finally:
    manager.close()


def saved_states(workdir: str) -> dict[int, str]:
  """step -> folder of every train state saved in a run folder, in
  `checkpoints/` or `best/` (both hold whole states); `checkpoints/` for a
  step both hold."""
  held = {}
  for name in ("best", "checkpoints"):
    directory = os.path.abspath(os.path.join(workdir, name))
    held.update(dict.fromkeys(saved_steps(directory), directory))
  return held


def newest_state(workdir: str) -> tuple[str, int] | None:
  """(folder, step) of the newest train state in a run folder: the last
  periodic checkpoint or, where a validation came after it (a run killed
  without a signal between periodic saves), the best state; None if neither
  `checkpoints/` nor `best/` holds one."""
  held = saved_states(workdir)
  return (held[max(held)], max(held)) if held else None


def restore_from(directory: str, like, step: int):
  """The state saved at `step` in `directory`, into `like`'s structure,
  shapes and shardings (read only: nothing there is deleted)."""
  source = Checkpoints(directory, save_every=1, keep=1_000_000)
  try:
    return source.restore(like, step)
  finally:
    source.close()


class Checkpoints:
  """Saves every `save_every` steps (async), keeps the last `keep`; or, with
  `best_metric`, keeps the `keep` states of highest metric."""

  def __init__(self, directory: str, *, save_every: int, keep: int,
               best_metric: str | None = None):
    best = {}
    if best_metric:
      best = dict(best_fn=lambda metrics: metrics[best_metric], best_mode="max",
                  keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=int(keep),
        enable_async_checkpointing=True, **best)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False,
           metrics: dict | None = None) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force,
                             metrics=metrics)

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, like, step: int | None = None):
    """Restores into the structure, shapes and shardings of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:  # Orbax: tree structures or shapes differ
      detail = " ".join(str(e).split())[:300]
      raise UserError(f"checkpoint {step} in {self.manager.directory} holds a state of "
                      f"another structure than this config builds ({detail}); resume with "
                      "the run's own config (stt_jax_run.json in the run folder), or start "
                      "a new --workdir with --config.train.init_from=<this run>") from None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export_weights(directory: str, params, model_config: dict, *,
                   overwrite: bool = False, info: dict | None = None) -> None:
  """Writes generator parameters and the model config as a standalone export
  (`params/`, an Orbax checkpoint, and `stt_jax_export.json`)."""
  directory = paths.clear_for_output(directory, overwrite)
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, EXPORT_MARKER), "w") as f:
    json.dump({"model": model_config, **(info or {})}, f, indent=2)


def is_export(path: str) -> bool:
  return os.path.exists(os.path.join(path, EXPORT_MARKER))


def read_export_info(path: str) -> dict:
  """The export's marker: its model config and what export_weights' `info`
  recorded (which weights, where from, the training patch)."""
  with open(os.path.join(path, EXPORT_MARKER)) as f:
    return json.load(f)


def read_export_model_config(path: str) -> dict:
  """The export's model config, keys added since it was made filled in."""
  return _with_keys_added_later(read_export_info(path)["model"])


def training_patch_shape(path: str) -> tuple[int, ...] | None:
  """The patch shape the weights in `path` (a run folder or an export) were
  trained on; None for exports made before exports recorded it."""
  if is_export(path):
    patch = read_export_info(path).get("training_patch_shape")
  else:
    patch = read_run_config(path)["data"]["patch_shape"]
  return tuple(int(n) for n in patch) if patch else None


def load_export(directory: str, model, patch_shape, mesh):
  """The exported generator parameters, replicated on `mesh`. Only their
  shapes are traced from `model` (nothing is initialised or allocated twice)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  dummy = jax.ShapeDtypeStruct((1, *patch_shape, 1), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(os.path.join(os.path.abspath(directory), "params"),
                              abstract)
