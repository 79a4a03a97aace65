"""Decoding (mask, contour) probabilities into instance labels.

Seeded watershed ("bc_watershed" of the original): seeds where the mask is
high and the contour low, 6-connected components of the seeds (those under
`min_seed_size` voxels dropped), watershed of -mask from the seeds inside the
foreground, objects under `min_size` voxels removed.

Probabilities are decoded as the uint8 values the pipeline stores
(p = u / 255, `infer.quantize`): `mask > t` is `u > floor(255 t)`, so
whole-volume and blockwise decoding see the same numbers.
"""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from stt_jax.infer.quantize import as_uint8, level


def seeds(mask_u8: np.ndarray, contour_u8: np.ndarray, seed_mask: float,
          seed_contour: float) -> np.ndarray:
  """Seed voxels: mask > seed_mask and contour <= seed_contour (as p's)."""
  return (mask_u8 > level(seed_mask)) & (contour_u8 <= level(seed_contour))


def foreground_region(mask_u8: np.ndarray, markers: np.ndarray,
                      foreground: float) -> np.ndarray:
  return (mask_u8 > level(foreground)) | (markers > 0)


def flood(mask_u8: np.ndarray, markers: np.ndarray, foreground: float, *,
          components: np.ndarray | None = None) -> np.ndarray:
  """Watershed of -mask from `markers` (ids > 0) within the foreground
  (mask > foreground, or a marker); uint32 labels carrying the markers' ids.

  Each 6-connected foreground component is flooded on its own, inside its own
  bounding box: skimage breaks ties between equal (level, age) heap entries
  by heap position, which depends on everything else in the heap, so one
  flood over a whole volume and one over a block could split a plateau
  differently. Per component the result depends on the component alone, so
  blockwise decoding equals whole-volume decoding for every component a
  block holds entirely. `components` may pass the labelled foreground.
  """
  if components is None:
    components = foreground_components(mask_u8, markers, foreground)
  out = np.zeros(mask_u8.shape, np.uint32)
  for label, box in enumerate(ndimage.find_objects(components), 1):
    if box is None:
      continue
    inside = components[box] == label
    seeds_in = np.where(inside, markers[box], 0)
    if not seeds_in.any():
      continue  # no seed: unreachable, background (as one global flood)
    # 255 - mask: uint8 and the same order as -mask (no float copy)
    labels = watershed(255 - mask_u8[box], seeds_in, mask=inside)
    out[box][inside] = labels[inside]
  return out


def foreground_components(mask_u8: np.ndarray, markers: np.ndarray,
                          foreground: float) -> np.ndarray:
  return cc3d.connected_components(foreground_region(mask_u8, markers, foreground),
                                   connectivity=6)


def below_mean_mask(mask_sums: np.ndarray, sizes: np.ndarray,
                    min_mean_mask: float) -> np.ndarray:
  """Which objects `decode.min_mean_mask` removes: mean mask probability
  (sum of uint8 levels / 255 / voxels) below it. One rule for the whole-
  volume and the blockwise decoder, from exact integer sums."""
  return np.asarray(mask_sums, np.float64) < min_mean_mask * 255.0 * np.asarray(sizes, np.float64)


def decode_instances(mask: np.ndarray, contour: np.ndarray, *,
                     seed_mask: float = 0.9, seed_contour: float = 0.8,
                     foreground: float = 0.85, min_seed_size: int = 8,
                     min_size: int = 128, min_mean_mask: float = 0.0) -> np.ndarray:
  """Whole-volume decoding (for volumes that fit in memory; the pipeline uses
  `blockwise.decode`, which equals this up to the ids).

  mask, contour: probabilities [depth, height, width], float in [0, 1] or
  uint8 (x 255). Objects under `min_size` voxels, or whose mean mask
  probability is below `min_mean_mask`, are removed. Returns uint32 ids
  numbered 1..N, 0 = background.
  """
  mask_u8, contour_u8 = as_uint8(mask), as_uint8(contour)
  markers = cc3d.connected_components(
      seeds(mask_u8, contour_u8, seed_mask, seed_contour), connectivity=6,
      out_dtype=np.uint32)
  if min_seed_size > 1:
    markers = cc3d.dust(markers, threshold=min_seed_size, connectivity=6)
  labels = flood(mask_u8, markers, foreground)
  if min_size > 1 or min_mean_mask > 0:
    ids, counts = fastremap.unique(labels, return_counts=True)
    drop = (counts < min_size) & (ids > 0)
    if min_mean_mask > 0:
      sums = np.bincount(labels.ravel(), weights=mask_u8.ravel())[ids]
      drop |= below_mean_mask(sums, counts, min_mean_mask) & (ids > 0)
    if drop.any():
      labels = fastremap.mask(labels, ids[drop])
  labels, _ = fastremap.renumber(labels, in_place=True)
  return labels.astype(np.uint32)

