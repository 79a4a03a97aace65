"""Orbax checkpoints of the train state, exported inference weights, and the
guard that keeps one run from silently writing over another."""

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
  os.makedirs(workdir, exist_ok=True)
  if not has_run or overwrite:
    with open(marker, "w") as f:
      f.write(config_json)


class Checkpoints:
  """Saves every `save_every` steps (async), keeps the last `keep`."""

  def __init__(self, directory: str, *, save_every: int, keep: int):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=int(keep),
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, like, step: int | None = None):
    """Restores into the structure, shapes and shardings of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export_weights(directory: str, params, model_config: dict, *,
                   overwrite: bool = False) -> None:
  """Writes generator parameters and the model config as a standalone export."""
  directory = paths.clear_for_output(directory, overwrite)
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, EXPORT_MARKER), "w") as f:
    json.dump({"model": model_config}, f, indent=2)


def is_export(path: str) -> bool:
  return os.path.exists(os.path.join(path, EXPORT_MARKER))


def read_export_model_config(path: str) -> dict:
  with open(os.path.join(path, EXPORT_MARKER)) as f:
    return json.load(f)["model"]


def load_export(directory: str, like_params):
  checkpointer = ocp.StandardCheckpointer()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params)
  return checkpointer.restore(os.path.join(os.path.abspath(directory), "params"),
                              abstract)
