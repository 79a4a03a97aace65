"""Instance decoding of volumes larger than memory, block by block.

Four restartable passes over a grid of blocks (memory: one block plus halo):

1. seeds: seed voxels (mask high, contour low) of each block, 6-connected
   components numbered (block index + 1) << 32 | local id, written to a
   scratch uint64 zarr; the block's fragment sizes are recorded.
2. merge: fragments touching across block faces are joined (union-find over
   the face planes, scipy's connected_components on the sparse graph); global
   seed sizes are summed and seeds under `min_seed_size` dropped, as the
   whole-volume decoder does. Global seed ids are 1..S.
3. watershed: each block grown by `halo` is flooded from the global seeds in
   it; the core is written (uint32, seed ids) with its id counts. Foreground
   components reaching the core and cut by the halo's outer face are counted:
   when there are none, the block equals whole-volume decoding exactly.
4. relabel: objects under `min_size` voxels, or with a mean mask probability
   under `min_mean_mask` (global counts and sums), are removed and the rest
   renumbered 1..N into `instances.zarr`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from stt_jax import memory_use
from stt_jax.data import sources
from stt_jax.infer import blocks as blocks_lib
from stt_jax.infer import postprocess
from stt_jax.infer import quantize


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  seed_mask: float = 0.9
  seed_contour: float = 0.8
  foreground: float = 0.85
  min_seed_size: int = 32
  min_size: int = 128
  min_mean_mask: float = 0.0
  block: tuple[int, int, int] = (64, 512, 512)
  halo: tuple[int, int, int] = (8, 64, 64)

  @classmethod
  def from_config(cls, d) -> "DecodeSettings":
    return cls(seed_mask=float(d.seed_mask), seed_contour=float(d.seed_contour),
               foreground=float(d.foreground), min_seed_size=int(d.min_seed_size),
               min_size=int(d.min_size), min_mean_mask=float(d.min_mean_mask),
               block=tuple(int(b) for b in d.block_shape),
               halo=tuple(int(h) for h in d.halo))


def _open_or_create(path: str, shape, dtype, block, voxel_size_nm,
                    translation_nm=None) -> sources.Volume:
  if os.path.exists(path):
    return sources.reopen_for_writing(path)
  return sources.create_volume(path, shape, dtype, chunks=blocks_lib.chunk_shape(block),
                               voxel_size_nm=voxel_size_nm, translation_nm=translation_nm)


def _read_probabilities(probabilities: sources.Volume, start, stop):
  size = [b - a for a, b in zip(start, stop)]
  data = probabilities.read([*start, 0], [*size, 2])
  return data[..., 0], data[..., 1]


def _seed_pass(probabilities, seeds_vol, grid, s: DecodeSettings, progress, tick):
  done = blocks_lib.Progress(progress, "seeds")
  for b in grid:
    if done.done(b.index):
      continue
    mask, contour = _read_probabilities(probabilities, b.start, b.stop)
    local = cc3d.connected_components(
        postprocess.seeds(mask, contour, s.seed_mask, s.seed_contour),
        connectivity=6, out_dtype=np.uint32)
    counts = np.bincount(local.ravel())[1:]
    offset = np.uint64(b.index + 1) << np.uint64(32)
    fragments = np.where(local > 0, local.astype(np.uint64) | offset, np.uint64(0))
    seeds_vol.write(b.start, fragments)
    ids = np.arange(1, len(counts) + 1, dtype=np.uint64) | offset
    done.mark(b.index, ids=ids, counts=counts.astype(np.int64), peak_mask=mask.max())
    tick()


def _merge_pass(seeds_vol, grid, shape, s: DecodeSettings, progress) -> dict:
  """Global seed id of every fragment: {"fragments": sorted uint64,
  "seed_ids": uint32 (0 = dropped), "seed_voxels": before the size filter,
  "peak_mask": the highest mask level, -1 if unknown}."""
  done = blocks_lib.Progress(progress, "merge")
  if done.done(0):
    result = done.load(0)
    if "seed_voxels" in result:  # else recorded by an older version: merge again
      return result
  seeds_done = blocks_lib.Progress(progress, "seeds")
  records = [seeds_done.load(b.index) for b in grid]
  fragments = np.concatenate([r["ids"] for r in records])
  counts = np.concatenate([r["counts"] for r in records])
  # the highest mask level (-1 where a block was seeded by an older version)
  peaks = [int(r["peak_mask"]) if "peak_mask" in r else -1 for r in records]
  edges = []
  for b in grid:
    for axis in range(3):
      if b.stop[axis] >= shape[axis]:
        continue
      lo, hi = list(b.start), list(b.stop)
      lo[axis], hi[axis] = b.stop[axis] - 1, b.stop[axis] + 1
      planes = seeds_vol.read(lo, [y - x for x, y in zip(lo, hi)])
      a, c = np.take(planes, 0, axis).ravel(), np.take(planes, 1, axis).ravel()
      both = (a > 0) & (c > 0)
      if both.any():
        edges.append(np.unique(np.stack([a[both], c[both]], 1), axis=0))
  n = len(fragments)
  if edges:
    pairs = np.searchsorted(fragments, np.concatenate(edges))
    graph = sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])),
                              shape=(n, n))
    _, component = csgraph.connected_components(graph, directed=False)
  else:
    component = np.arange(n)
  sizes = np.bincount(component, weights=counts, minlength=component.max(initial=-1) + 1)
  kept = sizes >= max(s.min_seed_size, 1)
  new_id = np.zeros(len(sizes), np.uint32)
  new_id[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.uint32)
  result = {"fragments": fragments, "seed_ids": new_id[component] if n else
            np.zeros(0, np.uint32), "seed_voxels": np.int64(counts.sum()),
            "peak_mask": np.int64(-1 if min(peaks) < 0 else max(peaks))}
  done.mark(0, **result)
  return result


def _remap(values: np.ndarray, keys: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """values mapped through sorted `keys` -> `targets`; 0 and unknown -> 0."""
  out = np.zeros(values.shape, targets.dtype)
  nonzero = values > 0
  if nonzero.any() and len(keys):
    v = values[nonzero]
    idx = np.minimum(np.searchsorted(keys, v), len(keys) - 1)
    out[nonzero] = np.where(keys[idx] == v, targets[idx], 0)
  return out


def _cut_components(components: np.ndarray, core: tuple[slice, ...],
                    grown: tuple, shape: Sequence[int]) -> int:
  """Foreground components of the grown block that reach its core and touch
  a face of the grown block inside the volume (cut by the halo)."""
  start, stop = grown
  faces = []
  for axis in range(3):
    if start[axis] > 0:
      faces.append(np.take(components, 0, axis).ravel())
    if stop[axis] < shape[axis]:
      faces.append(np.take(components, -1, axis).ravel())
  if not faces:
    return 0
  cut = np.intersect1d(np.unique(np.concatenate(faces)), np.unique(components[core]))
  return int(np.count_nonzero(cut))


def _watershed_pass(probabilities, seeds_vol, ws_vol, grid, shape, s, seed_map,
                    progress, tick):
  done = blocks_lib.Progress(progress, "watershed")
  for b in grid:
    if done.done(b.index):
      continue
    start, stop = b.grown(s.halo, shape)
    mask, _ = _read_probabilities(probabilities, start, stop)
    fragments = seeds_vol.read(start, [y - x for x, y in zip(start, stop)])
    markers = _remap(fragments, seed_map["fragments"], seed_map["seed_ids"])
    components = postprocess.foreground_components(mask, markers, s.foreground)
    labels = postprocess.flood(mask, markers, s.foreground, components=components)
    core = b.slices(start)
    cut = _cut_components(components, core, (start, stop), shape)
    labels = np.ascontiguousarray(labels[core])
    ws_vol.write(b.start, labels)
    inside = labels > 0
    ids, inverse, counts = np.unique(labels[inside], return_inverse=True, return_counts=True)
    mask_sums = np.bincount(inverse, weights=mask[core][inside],
                            minlength=len(ids)).astype(np.int64)
    done.mark(b.index, ids=ids, counts=counts, mask_sums=mask_sums, cut=np.int64(cut))
    tick()


def _relabel_pass(ws_vol, out_vol, grid, s, progress, tick) -> dict:
  ws_done = blocks_lib.Progress(progress, "watershed")
  records = [ws_done.load(b.index) for b in grid]
  ids = np.concatenate([r["ids"] for r in records]).astype(np.uint32)
  counts = np.concatenate([r["counts"] for r in records])
  uniq, inverse = np.unique(ids, return_inverse=True)
  sizes = np.bincount(inverse, weights=counts).astype(np.int64)
  large = sizes >= max(s.min_size, 1)
  keep = large
  if s.min_mean_mask > 0:
    sums = np.bincount(inverse, weights=np.concatenate([r["mask_sums"] for r in records]))
    keep = large & ~postprocess.below_mean_mask(sums, sizes, s.min_mean_mask)
  kept = uniq[keep]
  targets = np.arange(1, len(kept) + 1, dtype=np.uint32)
  done = blocks_lib.Progress(progress, "relabel")
  for b in grid:
    if done.done(b.index):
      continue
    labels = ws_vol.read(b.start, b.shape)
    out_vol.write(b.start, _remap(labels, kept, targets))
    done.mark(b.index)
    tick()
  return {"instances": int(len(kept)), "removed_by_mean_mask": int((large & ~keep).sum()),
          "components_cut_by_halo": int(sum(int(r["cut"]) for r in records))}


def decode(probabilities: sources.Volume, out_dir: str, settings: DecodeSettings, *,
           voxel_size_nm=None, progress_bar=None) -> tuple[sources.Volume, dict]:
  """Decodes probabilities [z, y, x, >= 2] uint8 (mask, contour) into
  `<out_dir>/instances.zarr` (uint32, 1..N). Finished blocks recorded under
  `<out_dir>/progress` are skipped; the instances keep the probabilities'
  `translation_nm`. Returns (instances, stats)."""
  shape = probabilities.shape[:3]
  s = settings
  grid = list(blocks_lib.iterate(shape, s.block))
  scratch = os.path.join(out_dir, "scratch")
  os.makedirs(scratch, exist_ok=True)
  seeds_vol = _open_or_create(os.path.join(scratch, "seeds.zarr"), shape, np.uint64,
                              s.block, voxel_size_nm)
  ws_vol = _open_or_create(os.path.join(scratch, "watershed.zarr"), shape, np.uint32,
                           s.block, voxel_size_nm)
  out_vol = _open_or_create(os.path.join(out_dir, "instances.zarr"), shape, np.uint32,
                            s.block, voxel_size_nm, probabilities.translation_nm)

  def tick() -> None:  # after each block of a pass
    memory_use.return_free_heap()
    if progress_bar is not None:
      progress_bar.update()

  _seed_pass(probabilities, seeds_vol, grid, s, out_dir, tick)
  seed_map = _merge_pass(seeds_vol, grid, shape, s, out_dir)
  blocks_lib.release_free_memory()
  _watershed_pass(probabilities, seeds_vol, ws_vol, grid, shape, s, seed_map, out_dir, tick)
  blocks_lib.release_free_memory()
  stats = _relabel_pass(ws_vol, out_vol, grid, s, out_dir, tick)
  stats["seeds"] = int(seed_map["seed_ids"].max(initial=0))
  stats["blocks"] = len(grid)
  stats["seed_voxels"] = int(seed_map["seed_voxels"])
  peak = int(seed_map["peak_mask"])
  stats["max_mask_probability"] = round(peak / 255, 4) if peak >= 0 else None
  note = why_no_instances(stats, s)
  if note:
    stats["decode_note"] = note
  if stats["components_cut_by_halo"]:
    stats["halo_note"] = (
        f"note: {stats['components_cut_by_halo']} foreground components reach past "
        "decode.halo, so ids near those block faces may (not must) differ from "
        "whole-volume decoding; for exact ids raise decode.halo, or decode.block_shape "
        "to hold whole sections")
  shutil.rmtree(scratch)
  return out_vol, stats


def why_no_instances(stats: dict, s: DecodeSettings) -> str:
  """One line saying which decoding step lost every object, and the knob to
  turn; "" when `decode` found instances. A short or failed training run
  gives maps that never reach the seed threshold: say so rather than leave
  a bare "0 instances"."""
  if stats["instances"]:
    return ""
  peak = stats.get("max_mask_probability")
  if peak is not None and round(peak * 255) <= quantize.level(s.seed_mask):
    also = (f" and decode.foreground ({s.foreground:.2f})"
            if round(peak * 255) <= quantize.level(s.foreground) else "")
    return (f"0 instances: no voxel's mask probability exceeds decode.seed_mask "
            f"{s.seed_mask:.2f} (the highest is {peak:.3f}); train longer, or lower "
            f"decode.seed_mask{also} below it")
  if not stats["seed_voxels"]:
    return (f"0 instances: no voxel has mask > decode.seed_mask {s.seed_mask:.2f} and "
            f"contour <= decode.seed_contour {s.seed_contour:.2f}; raise decode.seed_contour")
  if not stats["seeds"]:
    return (f"0 instances: {stats['seed_voxels']} seed voxels, but no seed of "
            f"decode.min_seed_size {s.min_seed_size} voxels; lower decode.min_seed_size")
  if stats.get("removed_by_mean_mask"):
    return (f"0 instances: {stats['seeds']} seeds, but every object of decode.min_size "
            f"{s.min_size} voxels has a mean mask probability below decode.min_mean_mask "
            f"{s.min_mean_mask:.2f}; lower decode.min_mean_mask")
  return (f"0 instances: {stats['seeds']} seeds, but every object is smaller than "
          f"decode.min_size {s.min_size} voxels; lower decode.min_size")


def passes(shape: Sequence[int], block: Sequence[int]) -> int:
  """Block visits of `decode` (for a progress bar)."""
  return 3 * len(list(blocks_lib.iterate(shape, block)))
