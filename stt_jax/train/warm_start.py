"""Starting a run from another model's weights (`train.init_from`).

The source is an export (`--mode=export`) or a run folder (its `best/` state
when it has one, else its latest checkpoint; the EMA weights where that run
kept them), read as host arrays whatever devices saved it. Generator
parameters whose path and shape match are copied into the fresh state before
step 0; the rest keep their initialisation. From a baseline into STT-UNET that
leaves only the SST blocks and the denoiser fresh, and since their output
projections start at zero (the denoiser's gate near it) the new run starts
from the baseline's function. The optimiser starts fresh (Adam's zero moments
do not depend on the weights); the discriminator is never copied.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from stt_jax.errors import UserError
from stt_jax.train import checkpoint


@dataclasses.dataclass
class Source:
  """Generator parameters read from `path` (host arrays, '/'-joined paths)."""
  path: str
  what: str                       # "export" or e.g. "best state, step 3000, weights"
  params: dict[str, np.ndarray]


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(tree).items()}


def _as_numpy(tree_metadata):
  """A restore target of host arrays shaped as the saved tree: restoring
  without one would re-create the saving run's shardings, which fails on
  another device count (a GPU run's folder read on a CPU)."""
  return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree_metadata)


def _restore_run(workdir: str) -> Source:
  for sub, label in (("best", "best"), ("checkpoints", "latest")):
    directory = os.path.join(workdir, sub)
    if not os.path.isdir(directory):
      continue
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    step = manager.latest_step()   # best/ keeps one state: the best one
    if step is not None:
      target = _as_numpy(manager.item_metadata(step))
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
    manager.close()
    if step is None:
      continue
    ema = state.get("ema_params") or {}
    kind = "EMA weights" if ema else "weights"
    return Source(workdir, f"{label} state, step {step}, {kind}",
                  _flat(ema if ema else state["params"]))
  raise UserError(f"train.init_from: {workdir} holds no checkpoint yet; "
                  "train it first or point at an export")


def read_source(path: str) -> Source:
  """The generator parameters of an export or of a run folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise UserError(f"train.init_from: {path} does not exist; give an export "
                    "(--mode=export) or a run folder")
  if checkpoint.is_export(path):
    checkpointer = ocp.StandardCheckpointer()
    saved = os.path.join(path, "params")
    target = _as_numpy(checkpointer.metadata(saved).item_metadata)
    return Source(path, "export", _flat(checkpointer.restore(saved, target)))
  if os.path.exists(os.path.join(path, checkpoint.RUN_MARKER)):
    return _restore_run(path)
  raise UserError(f"train.init_from: {path} is neither an stt_jax export "
                  f"({checkpoint.EXPORT_MARKER}) nor a run folder "
                  f"({checkpoint.RUN_MARKER})")


@dataclasses.dataclass
class Report:
  copied: list[str]
  fresh: list[str]                # in the new model only
  reshaped: list[str]             # in both, shapes differ: kept fresh
  unused: list[str]               # in the source only
  values: int                     # parameter values copied

  def summary(self, source: Source) -> str:
    def names(paths):  # module level, e.g. sst_enc1 for sst_enc1/spatial/query/kernel
      return ", ".join(sorted({p.split("/")[0] for p in paths}))
    parts = [f"init_from {source.path} ({source.what}): copied "
             f"{len(self.copied)} of {len(self.copied) + len(self.fresh) + len(self.reshaped)}"
             f" parameter tensors ({self.values:,} values)"]
    if self.fresh:
      parts.append(f"{len(self.fresh)} new kept fresh ({names(self.fresh)})")
    if self.reshaped:
      parts.append(f"{len(self.reshaped)} of another shape kept fresh "
                   f"({', '.join(self.reshaped)})")
    if self.unused:
      parts.append(f"{len(self.unused)} of the source unused ({names(self.unused)})")
    return "; ".join(parts)


def merge(fresh_params, source: Source):
  """(params, Report): `fresh_params` (a pytree of jax arrays, any sharding)
  with every leaf the source has at the same path and shape replaced by the
  source's values, placed as the fresh leaf was. Refuses a source that shares
  no parameter with the model (a wrong path or another architecture)."""
  flat = traverse_util.flatten_dict(fresh_params)
  copied, fresh, reshaped, values = [], [], [], 0
  out = {}
  for key, leaf in flat.items():
    name = "/".join(key)
    value = source.params.get(name)
    if value is None:
      fresh.append(name)
      out[key] = leaf
    elif tuple(value.shape) != tuple(leaf.shape):
      reshaped.append(f"{name} {tuple(value.shape)} vs {tuple(leaf.shape)}")
      out[key] = leaf
    else:
      host = value.astype(leaf.dtype)
      out[key] = jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                              lambda index, h=host: h[index])
      copied.append(name)
      values += host.size
  unused = sorted(set(source.params) - {"/".join(k) for k in flat})
  report = Report(copied, fresh, reshaped, unused, values)
  if not copied:
    detail = (f"e.g. {reshaped[0]}" if reshaped else
              f"its parameters are named {json.dumps(sorted(source.params)[:3])[1:-1]} ...")
    raise UserError(f"train.init_from: {source.path} shares no parameter with this model "
                    f"({detail}); check model.widths and the preset")
  return traverse_util.unflatten_dict(out), report


def apply(state, source: Source):
  """`state` (fresh) with generator weights, and their EMA, from `source`.
  Returns (state, Report)."""
  params, report = merge(state.params, source)
  ema = jax.tree.map(lambda p: p.copy(), params) if state.ema_params else state.ema_params
  return state.replace(params=params, ema_params=ema), report
