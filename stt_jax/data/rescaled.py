"""Volumes seen at another resolution than on disk (`model.input_scale`).

Mitochondria at 4-5 nm (VNC III, Lucchi) are twice as many voxels across as
at MitoEM's 8 nm, which the reference network was built for: a model can
read the image binned (f_z x f_y x f_x boxes averaged) and its probabilities
come back to the input's voxels by linear interpolation before decoding, so
instances, scores and every decode setting stay at the input's resolution.

* `BinnedVolume`: a lazy binned view of any volume: images by the box mean
  (integer images rounded half to even, as the viewing pyramids), labels by the most
  frequent id of the box (ties: an object before background, then the smaller
  id). A box cut by the volume's end averages the voxels it holds; its mode
  counts the last voxels again for the missing ones.
* `UpsampledVolume`: a lazy view of a coarse array at the fine voxels: fine
  voxel j of an axis with factor f sits at coarse coordinate
  (j + origin + 0.5) / f - 0.5 (voxel centres aligned: a coarse voxel covers
  fine voxels f*i .. f*i + f - 1); linear between the two nearest coarse
  voxels, the edge value beyond the outer centres.

Probabilities written at the coarse resolution carry `FULL_RESOLUTION` in
their zarr attributes (the fine shape, factors, origin and voxel size) so
that `full_resolution` reopens them at the fine voxels, for `--mode=decode`
as for validation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stt_jax.data import sources

FULL_RESOLUTION = "full_resolution"


def is_identity(factors: Sequence[int]) -> bool:
  return all(int(f) == 1 for f in factors)


def binned_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
  """[z, y, x(, channels)] of the binned view: ceil(n / f) per spatial axis."""
  return (*(math.ceil(int(n) / int(f)) for n, f in zip(shape[:3], factors)),
          *(int(n) for n in shape[3:]))


def binned_voxel_size(voxel_size_nm: Sequence[float], factors: Sequence[int]
                      ) -> tuple[float, ...]:
  """(z, y, x) nm of a binned voxel."""
  return tuple(float(v) * int(f) for v, f in zip(voxel_size_nm, factors))


def block_mode(boxes: np.ndarray) -> np.ndarray:
  """[..., k] ids -> [...] the most frequent of each row; ties go to a non-zero
  id, then to the smaller id. Rows of one id (most, away from boundaries) are
  answered by their minimum; the others count every pair (k is small,
  f_z * f_y * f_x: k^2 comparisons per row, no Python loop)."""
  low, high = boxes.min(axis=-1), boxes.max(axis=-1)
  mixed = low != high
  if not mixed.any():
    return low
  ordered = np.sort(boxes[mixed], axis=-1)  # argmax then picks the smallest of equals
  counts = (ordered[:, :, None] == ordered[:, None, :]).sum(axis=-1)
  score = 2 * counts + (ordered != 0)
  low[mixed] = np.take_along_axis(ordered, np.argmax(score, axis=-1)[:, None], axis=-1)[:, 0]
  return low


class BinnedVolume(sources.Volume):
  """`base` seen through f_z x f_y x f_x boxes: reduce = "mean" (images) or
  "mode" (instance ids)."""

  def __init__(self, base: sources.Volume, factors: Sequence[int], reduce: str):
    if reduce not in ("mean", "mode"):
      raise ValueError(f"reduce must be 'mean' or 'mode', got {reduce!r}")
    self.base, self.factors, self.reduce = base, tuple(int(f) for f in factors), reduce
    self.path = f"{base.path} binned {'x'.join(map(str, self.factors))}"

  @property
  def shape(self):
    return binned_shape(self.base.shape, self.factors)

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def voxel_size_nm(self):
    size = self.base.voxel_size_nm
    return binned_voxel_size(size, self.factors) if size else None

  @property
  def translation_nm(self):
    return self.base.translation_nm  # voxel 0's corner stays where it was

  def _read_box(self, box):
    spatial = box[:3]
    lo = [s.start * f for s, f in zip(spatial, self.factors)]
    hi = [min(s.stop * f, n) for s, f, n in zip(spatial, self.factors, self.base.shape)]
    fine = self.base.read_here([*lo, *(0 for _ in self.base.shape[3:])],
                               [*(b - a for a, b in zip(lo, hi)), *self.base.shape[3:]])
    want = [(s.stop - s.start) * f for s, f in zip(spatial, self.factors)]
    pad = [(0, w - n) for w, n in zip(want, fine.shape[:3])] + [(0, 0)] * (fine.ndim - 3)
    n = [s.stop - s.start for s in spatial]
    cut = any(p for _, p in pad)  # the volume's end cuts the last boxes
    if self.reduce == "mode":
      if cut:
        fine = np.pad(fine, pad, mode="edge")
      out = block_mode(self._boxes(fine, n))
    else:  # the sum of the voxels there are over their count
      read_shape = fine.shape[:3]
      if cut:
        fine = np.pad(fine, pad)
      # exact sums (int64 for integer images), one axis at a time: each pass
      # reduces a reshaped view, ~2x faster than summing three strided axes
      exact = np.int64 if np.issubdtype(fine.dtype, np.integer) else np.float64
      sums = fine
      for axis in (2, 1, 0):
        if self.factors[axis] > 1:
          split = (*sums.shape[:axis], n[axis], self.factors[axis], *sums.shape[axis + 1:])
          sums = sums.reshape(split).sum(axis=axis + 1, dtype=exact)
      # voxels per bin: f on each axis but in a bin the volume's end cuts
      counts = [np.minimum(f, held - f * np.arange(k)) for f, held, k in
                zip(self.factors, read_shape, n)]
      there = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
      out = sums / there.reshape(there.shape + (1,) * (sums.ndim - 3))
      if exact is np.int64:
        out = np.rint(out)  # an integer image's means round as its pyramids do
      out = out.astype(self.dtype)
    return np.ascontiguousarray(out[(slice(None),) * 3 + tuple(box[3:])])

  def _boxes(self, fine: np.ndarray, n: Sequence[int]) -> np.ndarray:
    """[n_z * f_z, n_y * f_y, n_x * f_x, ...] -> [n_z, n_y, n_x, ..., f_z * f_y * f_x]."""
    rest = fine.shape[3:]
    boxes = fine.reshape(n[0], self.factors[0], n[1], self.factors[1], n[2], self.factors[2],
                         *rest)
    boxes = np.moveaxis(boxes, (1, 3, 5), (3 + len(rest), 4 + len(rest), 5 + len(rest)))
    return boxes.reshape(*n, *rest, -1)


def binned_pair(image: sources.Volume, labels: sources.Volume | None,
                factors: Sequence[int]) -> tuple[sources.Volume, sources.Volume | None]:
  """(image, labels) as a model of `model.input_scale` = `factors` trains on
  them: the image's means, the labels' modes (both themselves at 1, 1, 1)."""
  if is_identity(factors):
    return image, labels
  return (BinnedVolume(image, factors, "mean"),
          BinnedVolume(labels, factors, "mode") if labels is not None else None)


def _linear_axis(array: np.ndarray, axis: int, start: int, stop: int, factor: int,
                 origin: int, coarse_start: int, coarse_size: int) -> np.ndarray:
  """`array` (coarse voxels coarse_start.. along `axis`) interpolated at fine
  voxels start..stop-1 of that axis."""
  fine = np.arange(start, stop)
  where = np.clip((fine + origin + 0.5) / factor - 0.5, 0, coarse_size - 1)
  below = np.floor(where).astype(np.int64)
  above = np.minimum(below + 1, coarse_size - 1)
  weight = (where - below).astype(np.float32)
  shape = [1] * array.ndim
  shape[axis] = -1
  weight = weight.reshape(shape)
  low = np.take(array, below - coarse_start, axis=axis).astype(np.float32)
  high = np.take(array, above - coarse_start, axis=axis).astype(np.float32)
  return low + weight * (high - low)


class UpsampledVolume(sources.Volume):
  """`coarse` ([z, y, x(, channels)], e.g. probabilities) at the fine voxels of
  a volume of `shape` (z, y, x), fine voxel 0 lying `origin` (z, y, x) fine
  voxels past the start of coarse voxel 0; the coarse array must reach the
  last fine voxel. Values are rounded back to the coarse dtype."""

  SLAB = 8  # fine sections interpolated at a time

  def __init__(self, coarse: sources.Volume, factors: Sequence[int], shape: Sequence[int],
               origin: Sequence[int] = (0, 0, 0),
               voxel_size_nm: Sequence[float] | None = None):
    self.coarse, self.factors = coarse, tuple(int(f) for f in factors)
    self.origin = tuple(int(o) for o in origin)
    self._shape = tuple(int(n) for n in shape[:3])
    need = binned_shape([n + o for n, o in zip(self._shape, self.origin)], self.factors)
    if any(c < n for c, n in zip(coarse.shape[:3], need)) or min(self.origin) < 0:
      raise ValueError(f"{coarse.path}: shape {coarse.shape[:3]} does not cover the "
                       f"{self.factors} binning of {self._shape} from origin {self.origin} "
                       f"({need[:3]})")
    self._voxel_size = tuple(float(v) for v in voxel_size_nm) if voxel_size_nm else None
    self.path = coarse.path

  @property
  def shape(self):
    return (*self._shape, *self.coarse.shape[3:])

  @property
  def dtype(self):
    return self.coarse.dtype

  @property
  def voxel_size_nm(self):
    if self._voxel_size:
      return self._voxel_size
    size = self.coarse.voxel_size_nm
    return tuple(s / f for s, f in zip(size, self.factors)) if size else None

  @property
  def translation_nm(self):
    """The coarse array's, moved to fine voxel 0 (`origin` fine voxels in)."""
    offset, size = self.coarse.translation_nm, self.voxel_size_nm
    if not any(self.origin) or size is None:
      return offset
    return tuple(float(t + o * v) for t, o, v in zip(offset or (0.0, 0.0, 0.0), self.origin,
                                                     size))

  def _read_box(self, box):
    spatial = box[:3]
    lo, hi = [], []
    for s, f, o, n in zip(spatial, self.factors, self.origin, self.coarse.shape):
      lo.append(max(math.floor((s.start + o + 0.5) / f - 0.5), 0))
      hi.append(min(math.floor((s.stop - 1 + o + 0.5) / f - 0.5) + 2, n))
    channels = list(self.coarse.shape[3:])
    values = self.coarse.read_here([*lo, *(0 for _ in channels)],
                                   [*(b - a for a, b in zip(lo, hi)), *channels])
    values = values[(slice(None),) * 3 + tuple(box[3:])]
    out = np.empty([s.stop - s.start for s in spatial] + list(values.shape[3:]), self.dtype)
    # slab by slab along z: float temporaries of a few sections, not of the box
    first, last = spatial[0].start, spatial[0].stop
    for start in range(first, last, self.SLAB):
      stop = min(start + self.SLAB, last)
      slab = values
      for axis, (a, b, f, o, c, n) in enumerate(zip(
          (start, spatial[1].start, spatial[2].start), (stop, spatial[1].stop, spatial[2].stop),
          self.factors, self.origin, lo, self.coarse.shape)):
        slab = _linear_axis(slab, axis, a, b, f, o, c, n)
      if np.issubdtype(self.dtype, np.integer):
        info = np.iinfo(self.dtype)
        slab = np.clip(np.rint(slab), info.min, info.max)
      out[start - first:stop - first] = slab
    return out


def full_resolution_attributes(shape: Sequence[int], factors: Sequence[int],
                               origin: Sequence[int], voxel_size_nm: Sequence[float]) -> dict:
  """What a coarse output records so that `full_resolution` can reopen it."""
  return {FULL_RESOLUTION: {"shape": [int(n) for n in shape[:3]],
                            "factors": [int(f) for f in factors],
                            "origin": [int(o) for o in origin],
                            "voxel_size_nm": [float(v) for v in voxel_size_nm]}}


def full_resolution(volume: sources.Volume) -> sources.Volume:
  """`volume` at the resolution it was predicted for: an `UpsampledVolume`
  where its zarr attributes say it is coarse (`FULL_RESOLUTION`), else itself."""
  attributes = sources.zarr_attributes(volume.path) if isinstance(
      volume, sources.TensorStoreVolume) else {}
  fine = attributes.get(FULL_RESOLUTION)
  if not fine:
    return volume
  return UpsampledVolume(volume, fine["factors"], fine["shape"], fine["origin"],
                         voxel_size_nm=fine["voxel_size_nm"])
