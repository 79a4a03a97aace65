"""Random training patches read from chunked volumes through TensorStore.

Patch i of the batch for step s is a pure function of (seed, s, i): a resumed
run sees the same stream, prefetching threads cannot reorder it, and in a
multi-process run each process draws only its own rows of the global batch
(`process_index`, `process_count`) yet the global batch is the one a single
process would draw. Reads of all patches of a batch are issued together
(TensorStore futures) before any is awaited. With geometric augmentation on,
each read carries an in-plane margin (`augment.in_plane_margin`) so that a
zoom-out, a rotation or a misaligned section shows real tissue from beyond
the patch.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from stt_jax.data import augment, targets
from stt_jax.data.sources import Volume
from stt_jax.errors import UserError


class _Pair(NamedTuple):
  """One image/label pair and the box [lo, hi) patches are drawn from."""
  image: Volume
  labels: Volume
  lo: np.ndarray
  hi: np.ndarray


class PatchSampler:
  """Draws batches of (image, target) patches from one image/label pair, or
  from several (`more_volumes`: each patch from one pair, drawn in
  proportion to the pairs' voxels).

  Batches: image float32 [batch, depth, height, width, 1] in [0, 1];
  target float32 [batch, depth, height, width, 2] = (mask, contour); with
  `unlabelled_id` >= 0, valid float32 [batch, depth, height, width, 1]: 0 on
  voxels of that id (not annotated) and where targets read one.
  """

  def __init__(self, image: Volume, labels: Volume, *,
               patch_shape: Sequence[int], batch_size: int, seed: int,
               augment_config=None, contour_width: int = 2, distance_voxel_size=None,
               foreground_bias: float = 0.0, foreground_tries: int = 8,
               region: Sequence[Sequence[int]] | None = None,
               more_volumes: Sequence[tuple[Volume, Volume]] = (),
               process_index: int = 0, process_count: int = 1,
               check_foreground: bool = True, unlabelled_id: int = -1):
    self.patch_shape = tuple(int(p) for p in patch_shape)
    self._pairs = [self._pair(image, labels, region)] + [
        self._pair(i, l, None) for i, l in more_volumes]
    voxels = np.array([np.prod(p.hi - p.lo, dtype=np.float64) for p in self._pairs])
    self._pair_odds = voxels / voxels.sum()
    self.batch_size = int(batch_size)
    if self.batch_size % process_count:
      raise UserError(f"train.batch_size={batch_size} must be a multiple of the "
                      f"{process_count} processes")
    share = self.batch_size // process_count
    self.rows = range(process_index * share, (process_index + 1) * share)
    self.seed = int(seed)
    self.augment_config = augment_config
    self.contour_width = int(contour_width)
    # (z, y, x): also the normalised distance target, measured in these units
    self.distance_voxel_size = (None if distance_voxel_size is None
                                else tuple(float(v) for v in distance_voxel_size))
    self.foreground_bias = float(foreground_bias)
    # in-plane pixels read beyond each side for the geometric augmentations
    self.margin = augment.in_plane_margin(augment_config, self.patch_shape[1:])
    self.foreground_tries = int(foreground_tries)
    # labels of this id are not annotated: no target there (batch "valid")
    self.unlabelled_id = int(unlabelled_id)
    if check_foreground:
      for k in range(len(self._pairs)):
        self._check_foreground(k)

  def _pair(self, image: Volume, labels: Volume, region) -> _Pair:
    if image.shape != labels.shape:
      raise UserError(f"image {image.path} has shape {image.shape} but labels "
                      f"{labels.path} have shape {labels.shape}; they must match")
    if labels.dtype.kind not in "ui":
      raise UserError(f"labels {labels.path} have dtype {labels.dtype}; "
                      "instance labels must be integers")
    lo, hi = (np.array(region[0]), np.array(region[1])) if region else (
        np.zeros(3, int), np.array(image.shape))
    if np.any(hi - lo < np.array(self.patch_shape)):
      raise UserError(f"patch {list(self.patch_shape)} is larger than the sampled "
                      f"region {(hi - lo).tolist()} of {image.path}; lower data.patch_shape")
    return _Pair(image, labels, lo, hi)

  def _check_foreground(self, k: int, probes: int = 16) -> None:
    """Refuses labels with no foreground where patches are drawn. Reading a
    whole region would defeat larger-than-memory volumes, so `probes` random
    patches are read at once; all empty means a wrong path, region or label
    volume far more often than a truly sparse one."""
    pair = self._pairs[k]
    rng = np.random.default_rng([self.seed, 2 ** 31] + ([k] if k else []))
    starts = [self._draw_in(pair, rng) for _ in range(probes)]
    reads = [pair.labels.read_async(s, self.patch_shape) for s in starts]
    if not any(self._foreground(f.result()).any() for f in reads):
      box = [pair.lo.tolist(), pair.hi.tolist()]
      raise UserError(f"labels {pair.labels.path} hold no foreground in {probes} random "
                      f"patches of region {box}; check the label path and "
                      "data.<split>.region")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`."""
    rngs = [np.random.default_rng([self.seed, int(step), i]) for i in self.rows]
    reads = [self._read_box(*self._draw(rng)) for rng in rngs]
    label_reads = [self._pairs[k].labels.read_async(lo, shape) for k, lo, shape, _ in reads]
    image_reads = [self._pairs[k].image.read_async(lo, shape) for k, lo, shape, _ in reads]
    label_patches = [f.result() for f in label_reads]
    for i, rng in enumerate(rngs):
      if rng.uniform() >= self.foreground_bias:
        continue
      # rejection sampling: redraw until the patch (not its margin) holds foreground
      for _ in range(self.foreground_tries):
        if self._foreground(self._crop(label_patches[i], reads[i][3])).any():
          break
        reads[i] = self._read_box(*self._draw(rng))
        k, lo, shape, _ = reads[i]
        image_reads[i] = self._pairs[k].image.read_async(lo, shape)
        label_patches[i] = self._pairs[k].labels.read(lo, shape)
    images, target_list, valid_list = [], [], []
    for image_future, labels, read, rng in zip(image_reads, label_patches, reads, rngs):
      image, labels = self._augment(image_future.result(), labels, read[3], rng)
      images.append(image)
      if self.unlabelled_id >= 0:
        valid_list.append(targets.annotated_mask(labels, self.unlabelled_id,
                                                 self.contour_width))
        labels = np.where(labels == self.unlabelled_id, 0, labels).astype(labels.dtype)
      target_list.append(targets.make_targets(labels, self.contour_width,
                                              self.distance_voxel_size))
    batch = {"image": np.stack(images)[..., None], "target": np.stack(target_list)}
    if valid_list:
      batch["valid"] = np.stack(valid_list)[..., None]
    return batch

  def _foreground(self, labels: np.ndarray) -> np.ndarray:
    """Annotated objects: ids > 0 other than data.unlabelled_id."""
    return (labels > 0) & (labels != self.unlabelled_id)

  def _draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """(pair index, patch start). One pair draws nothing for its index, so a
    single volume's stream is the same as before several were allowed."""
    k = 0 if len(self._pairs) == 1 else int(rng.choice(len(self._pairs), p=self._pair_odds))
    return k, self._draw_in(self._pairs[k], rng)

  def _draw_in(self, pair: _Pair, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(pair.lo, pair.hi - np.array(self.patch_shape) + 1)

  def _read_box(self, k: int, start: np.ndarray):
    """(pair, read start, read shape, patch offset in the read): the patch
    plus `margin` in-plane pixels each side, cut where the region ends."""
    pair = self._pairs[k]
    pad = np.array([0, self.margin, self.margin])
    lo = np.maximum(start - pad, pair.lo)
    hi = np.minimum(start + np.array(self.patch_shape) + pad, pair.hi)
    return k, lo, tuple(int(n) for n in hi - lo), tuple(int(n) for n in (start - lo)[1:])

  def _crop(self, array: np.ndarray, offset) -> np.ndarray:
    (oy, ox), (_, h, w) = offset, self.patch_shape
    return array[:, oy:oy + h, ox:ox + w]

  def _augment(self, image, labels, offset, rng):
    """image, labels [depth, height, width]: the read (patch plus margins).
    Geometric transforms on image and labels, then image-only defects; returns
    the patch."""
    cfg = self.augment_config
    image = image.astype(np.float32) / 255.0
    if cfg is None or not cfg.enabled:  # no transform drawn: the bare crop
      return augment.warp_crop(image, labels, rng, out_height_width=self.patch_shape[1:],
                               offset=offset)
    chance = lambda p: p > 0 and rng.uniform() < p
    rescale = chance(cfg.get("rescale_prob", 0.0))
    elastic = chance(cfg.get("elastic_prob", 0.0))
    misalign = chance(cfg.get("misalignment_prob", 0.0))
    rotate = chance(cfg.get("rotate_prob", 0.0))
    image, labels = augment.warp_crop(
        image, labels, rng, out_height_width=self.patch_shape[1:], offset=offset,
        scale_range=tuple(cfg.rescale_range) if rescale else None,
        rotation_range=(0.0, 360.0) if rotate else None,
        elastic=(cfg.elastic_alpha, cfg.elastic_sigma) if elastic else None,
        misalignment_shift=int(cfg.misalignment_max_shift) if misalign else 0)
    image, labels = augment.flip_transpose(
        image, labels, rng, flip_z=cfg.flip_z, flip_yx=cfg.flip_yx,
        transpose_xy=cfg.transpose_xy)
    if chance(cfg.get("missing_section_prob", 0.0)):
      image = augment.missing_section(image, rng)
    if chance(cfg.get("motion_blur_prob", 0.0)):
      image = augment.motion_blur(image, rng)
    if chance(cfg.get("cut_blur_prob", 0.0)):
      image = augment.cut_blur(image, rng)
    if chance(cfg.get("cut_noise_prob", 0.0)):
      image = augment.cut_noise(image, rng)
    if rng.uniform() < cfg.intensity_prob:
      image = augment.intensity(image, rng)
    return image, labels

  def iterate(self, first_step: int, last_step: int, prefetch: int = 4,
              workers: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (step, batch) for first_step <= step < last_step, in order,
    `workers` batches assembled at once and up to `prefetch` ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      pending = collections.deque()
      next_step = first_step
      while next_step < last_step and len(pending) < prefetch:
        pending.append((next_step, pool.submit(self.batch, next_step)))
        next_step += 1
      while pending:
        step, future = pending.popleft()
        if next_step < last_step:
          pending.append((next_step, pool.submit(self.batch, next_step)))
          next_step += 1
        yield step, future.result()
