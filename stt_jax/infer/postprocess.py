"""Decoding (mask, contour) probabilities into instance labels.

Seeded watershed ("bc_watershed" of the original): seeds where the mask is
high and the contour low, 6-connected components of the seeds, watershed of
-mask from the seeds inside the foreground, small objects removed.
"""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np
from skimage.segmentation import watershed


def decode_instances(mask: np.ndarray, contour: np.ndarray, *,
                     seed_mask: float = 0.9, seed_contour: float = 0.8,
                     foreground: float = 0.85, min_seed_size: int = 8,
                     min_size: int = 128) -> np.ndarray:
  """mask, contour: float probabilities [depth, height, width] in [0, 1].

  Returns uint32 instance ids [depth, height, width], 0 = background,
  numbered 1..N.
  """
  seeds = (mask > seed_mask) & (contour < seed_contour)
  markers = cc3d.connected_components(seeds, connectivity=6, out_dtype=np.uint32)
  if min_seed_size > 1:
    markers = cc3d.dust(markers, threshold=min_seed_size, connectivity=6)
  labels = watershed(-mask, markers, mask=(mask > foreground) | (markers > 0))
  labels = np.asarray(labels, np.uint32)
  if min_size > 1:
    ids, counts = fastremap.unique(labels, return_counts=True)
    small = ids[(counts < min_size) & (ids > 0)]
    if len(small):
      labels = fastremap.mask(labels, small)
  labels, _ = fastremap.renumber(labels, in_place=True)
  return labels.astype(np.uint32)
