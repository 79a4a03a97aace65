"""Block grids and the on-disk record of finished blocks (restartable stages).

Every stage of whole-volume segmentation (predict, seeds, watershed,
relabel) walks the same grid of output blocks and records each finished block
as a file under `<output>/progress/<stage>/`, written only after the block's
data are on disk. A killed run restarted with the same command skips the
recorded blocks, so its output equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

from stt_jax import memory_use
from stt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Block:
  index: int                  # raster index in the grid
  position: tuple[int, ...]   # grid coordinates
  start: tuple[int, ...]      # voxel box [start, stop)
  stop: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(b - a for a, b in zip(self.start, self.stop))

  def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
    origin = origin or [0] * len(self.start)
    return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))

  def grown(self, halo: Sequence[int], shape: Sequence[int]):
    """(start, stop) of this block grown by `halo`, clipped to `shape`."""
    start = tuple(max(a - h, 0) for a, h in zip(self.start, halo))
    stop = tuple(min(b + h, s) for b, h, s in zip(self.stop, halo, shape))
    return start, stop


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
  return tuple(math.ceil(s / b) for s, b in zip(shape, block))


def iterate(shape: Sequence[int], block: Sequence[int]) -> Iterator[Block]:
  """Blocks of `block` voxels tiling `shape` in raster (z, y, x) order; the
  last block along an axis is cut at the volume's edge."""
  grid = grid_shape(shape, block)
  for index, pos in enumerate(itertools.product(*[range(g) for g in grid])):
    start = tuple(p * b for p, b in zip(pos, block))
    stop = tuple(min(a + b, s) for a, b, s in zip(start, block, shape))
    yield Block(index, pos, start, stop)


def chunk_shape(block: Sequence[int], preferred: Sequence[int] = (16, 128, 128)):
  """Storage chunks that tile a block exactly (so blocks never share a chunk
  and parallel or restarted writes cannot clobber each other)."""
  return tuple(math.gcd(int(b), int(p)) for b, p in zip(block, preferred))


class Progress:
  """Finished blocks of one stage: `<root>/progress/<stage>/<index>.npz`,
  optionally holding the block's small results (sizes, ids)."""

  def __init__(self, root: str, stage: str):
    self.dir = os.path.join(root, "progress", stage)
    os.makedirs(self.dir, exist_ok=True)

  def _path(self, index: int) -> str:
    return os.path.join(self.dir, f"{index:08d}.npz")

  def done(self, index: int) -> bool:
    return os.path.exists(self._path(index))

  def mark(self, index: int, **arrays: np.ndarray) -> None:
    tmp = self._path(index) + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, self._path(index))  # atomic: a crash leaves no half record

  def load(self, index: int) -> dict[str, np.ndarray]:
    with np.load(self._path(index)) as f:
      return {k: f[k] for k in f.files}

  def count(self) -> int:
    return sum(1 for n in os.listdir(self.dir) if n.endswith(".npz") and ".tmp" not in n)


MANIFEST = "segment.json"
# lock files of runs split in parts (`output_lock`): not a sign of foreign content
LOCKS = (".lock", ".decode.lock")


def _foreign_entries(out_dir: str) -> list[str]:
  return [n for n in os.listdir(out_dir) if n not in LOCKS]


@contextlib.contextmanager
def output_lock(out_dir: str, name: str = ".lock", wait: bool = True) -> Iterator[bool]:
  """Holds the lock file `<out_dir>/<name>` (creating the folder), for the
  parts of a run split with --part that share the folder: yields True once
  held, or False at once when `wait` is False and another process holds it.
  An OS lock (fcntl), so a killed holder releases it."""
  import filelock  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  lock = filelock.FileLock(os.path.join(out_dir, name), timeout=-1 if wait else 0)
  try:
    lock.acquire()
  except filelock.Timeout:
    yield False
    return
  try:
    yield True
  finally:
    lock.release()


def is_finished(out_dir: str) -> bool:
  manifest_path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(manifest_path):
    return False
  with open(manifest_path) as f:
    return bool(json.load(f).get("finished"))


def check_output(out_dir: str, overwrite: bool) -> None:
  """Refuses early (before a model loads) what `open_output` would refuse
  whatever the settings: a finished run or a folder that is not a run."""
  if overwrite or not os.path.exists(out_dir):
    return
  if os.path.isfile(os.path.join(out_dir, MANIFEST)):
    if is_finished(out_dir):
      raise UserError(f"{out_dir} already holds a finished segmentation; pass "
                      "--overwrite to replace it or choose another --output")
  elif os.path.isfile(out_dir) or _foreign_entries(out_dir):
    raise UserError(f"{out_dir} already exists and is not an stt_jax output; pass "
                    "--overwrite to replace it or choose another --output")


def open_output(out_dir: str, settings: dict, overwrite: bool) -> bool:
  """Prepares `out_dir` for a run with `settings` (JSON-able).

  Returns True when it continues an unfinished run with the same settings.
  A finished run, a different run or a foreign folder is refused unless
  `overwrite` (then removed).
  """
  from stt_jax import paths  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  manifest_path = os.path.join(out_dir, MANIFEST)
  settings = json.loads(json.dumps(settings))
  check_output(out_dir, overwrite)
  if not overwrite and os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      previous = json.load(f)
    if previous.get("finished"):
      raise UserError(f"{out_dir} already holds a finished segmentation; pass "
                      "--overwrite to replace it or choose another --output")
    keys = list(settings) + [k for k in previous.get("settings", {}) if k not in settings]
    for key in keys:
      if previous.get("settings", {}).get(key) != settings.get(key):
        raise UserError(f"{out_dir} holds an unfinished run with a different {key}; "
                        "rerun with its settings to continue, or pass --overwrite")
    return True
  if overwrite or not os.path.isdir(out_dir) or _foreign_entries(out_dir):
    paths.clear_for_output(out_dir, overwrite)
  os.makedirs(out_dir, exist_ok=True)  # a split run's lock may be there already
  with open(manifest_path, "w") as f:
    json.dump({"settings": settings, "finished": False}, f, indent=2)
  return False


def finish_output(out_dir: str, summary: dict) -> None:
  manifest_path = os.path.join(out_dir, MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest.update(summary, finished=True)
  tmp = manifest_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, manifest_path)


def release_free_memory() -> None:
  """Collects garbage, then `memory_use.return_free_heap`: between stages,
  so that the next stage's peak does not sit on top of the last one's."""
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  memory_use.return_free_heap()
