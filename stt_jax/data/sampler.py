"""Random training patches read from chunked volumes through TensorStore.

Patch i of the batch for step s is a pure function of (seed, s, i): a resumed
run sees the same stream, prefetching threads cannot reorder it, and in a
multi-process run each process draws only its own rows of the global batch
(`process_index`, `process_count`) yet the global batch is the one a single
process would draw. Reads of all patches of a batch are issued together
(TensorStore futures) before any is awaited.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator, Sequence

import numpy as np

from stt_jax.data import augment, targets
from stt_jax.data.sources import Volume
from stt_jax.errors import UserError


class PatchSampler:
  """Draws batches of (image, target) patches from one image/label pair.

  Batches: image float32 [batch, depth, height, width, 1] in [0, 1];
  target float32 [batch, depth, height, width, 2] = (mask, contour).
  """

  def __init__(self, image: Volume, labels: Volume, *,
               patch_shape: Sequence[int], batch_size: int, seed: int,
               augment_config=None, contour_width: int = 2, distance_voxel_size=None,
               foreground_bias: float = 0.0, foreground_tries: int = 8,
               region: Sequence[Sequence[int]] | None = None,
               process_index: int = 0, process_count: int = 1,
               check_foreground: bool = True):
    if image.shape != labels.shape:
      raise UserError(f"image {image.path} has shape {image.shape} but labels "
                      f"{labels.path} have shape {labels.shape}; they must match")
    if labels.dtype.kind not in "ui":
      raise UserError(f"labels {labels.path} have dtype {labels.dtype}; "
                      "instance labels must be integers")
    self.image, self.labels = image, labels
    self.patch_shape = tuple(int(p) for p in patch_shape)
    lo, hi = (np.array(region[0]), np.array(region[1])) if region else (
        np.zeros(3, int), np.array(image.shape))
    if np.any(hi - lo < np.array(self.patch_shape)):
      raise UserError(f"patch {list(self.patch_shape)} is larger than the sampled "
                      f"region {list(hi - lo)} of {image.path}; lower data.patch_shape")
    self._lo, self._hi = lo, hi
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
    self.foreground_tries = int(foreground_tries)
    if check_foreground:
      self._check_foreground()

  def _check_foreground(self, probes: int = 16) -> None:
    """Refuses labels with no foreground where patches are drawn. Reading a
    whole region would defeat larger-than-memory volumes, so `probes` random
    patches are read at once; all empty means a wrong path, region or label
    volume far more often than a truly sparse one."""
    rng = np.random.default_rng([self.seed, 2 ** 31])
    starts = [self._draw_start(rng) for _ in range(probes)]
    reads = [self.labels.read_async(s, self.patch_shape) for s in starts]
    if not any(f.result().any() for f in reads):
      box = [self._lo.tolist(), self._hi.tolist()]
      raise UserError(f"labels {self.labels.path} hold no foreground in {probes} random "
                      f"patches of region {box}; check the label path and "
                      "data.<split>.region")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`."""
    rngs = [np.random.default_rng([self.seed, int(step), i]) for i in self.rows]
    starts = [self._draw_start(rng) for rng in rngs]
    label_reads = [self.labels.read_async(s, self.patch_shape) for s in starts]
    image_reads = [self.image.read_async(s, self.patch_shape) for s in starts]
    label_patches = [f.result() for f in label_reads]
    for i, rng in enumerate(rngs):
      if rng.uniform() >= self.foreground_bias:
        continue
      # rejection sampling: redraw until the patch holds foreground
      for _ in range(self.foreground_tries):
        if label_patches[i].any():
          break
        starts[i] = self._draw_start(rng)
        image_reads[i] = self.image.read_async(starts[i], self.patch_shape)
        label_patches[i] = self.labels.read(starts[i], self.patch_shape)
    images, target_list = [], []
    for image_future, labels, rng in zip(image_reads, label_patches, rngs):
      image = image_future.result()
      image, labels = self._augment(image, labels, rng)
      images.append(image)
      target_list.append(targets.make_targets(labels, self.contour_width,
                                              self.distance_voxel_size))
    return {"image": np.stack(images)[..., None], "target": np.stack(target_list)}

  def _draw_start(self, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(self._lo, self._hi - np.array(self.patch_shape) + 1)

  def _augment(self, image, labels, rng):
    """Geometric transforms on image and labels, then image-only defects."""
    cfg = self.augment_config
    image = image.astype(np.float32) / 255.0
    if cfg is None or not cfg.enabled:
      return image, labels
    chance = lambda p: p > 0 and rng.uniform() < p
    if chance(cfg.get("rescale_prob", 0.0)):
      image, labels = augment.rescale(image, labels, rng, low=cfg.rescale_range[0],
                                      high=cfg.rescale_range[1])
    if chance(cfg.get("elastic_prob", 0.0)):
      image, labels = augment.elastic(image, labels, rng, alpha=cfg.elastic_alpha,
                                      sigma=cfg.elastic_sigma)
    if chance(cfg.get("misalignment_prob", 0.0)):
      image, labels = augment.misalignment(image, labels, rng,
                                           max_shift=cfg.misalignment_max_shift)
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
