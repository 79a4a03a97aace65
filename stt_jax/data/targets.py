"""Training targets from instance labels: binary mask and instance contour.

Both start from the original Res-UNET-R rules, made 3D where instances meet
along z (see docs/architecture.md):

* touching instances are separated: a voxel becomes background when its
  in-plane 3x3 window, or its z-neighbours at the same (y, x), hold another id;
* a voxel is contour when its in-plane (2w+1)x(2w+1) window holds a label and
  is not uniform (object/background and object/object borders), or when a
  z-neighbour holds another non-zero id. Object/background faces along z are
  not contour: with z 4-10x coarser than x/y that would erase thin objects.

The per-slice rules alone leave no boundary between instances stacked in z, so
their seeds merge in 3D decoding (measured: AP-75 0.21 when decoding the
ground truth's own per-slice targets on the demo volume).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _z_contacts(labels: np.ndarray) -> np.ndarray:
  """True where a z-neighbour (same y, x) holds a different non-zero id."""
  contact = np.zeros(labels.shape, bool)
  upper, lower = labels[1:], labels[:-1]
  meet = (upper > 0) & (lower > 0) & (upper != lower)
  contact[1:] |= meet
  contact[:-1] |= meet
  return contact


def separate_touching(labels: np.ndarray) -> np.ndarray:
  """Sets to 0 every voxel whose in-plane 3x3 window or z-neighbours hold
  another id. labels: [depth, height, width] integer ids (0 = background)."""
  footprint = (1, 3, 3)
  high = ndimage.maximum_filter(labels, size=footprint, mode="nearest")
  # the smallest non-zero id in the window: background mapped to the max value
  big = np.iinfo(labels.dtype).max
  low = ndimage.minimum_filter(np.where(labels > 0, labels, big), size=footprint,
                               mode="nearest")
  touching = (labels > 0) & (((low != high) & (low != big)) | _z_contacts(labels))
  return np.where(touching, 0, labels).astype(labels.dtype)


def instance_contour(labels: np.ndarray, width: int = 2) -> np.ndarray:
  """Contour (see module doc). labels: [depth, height, width] integer ids.

  Returns uint8 of the same shape.
  """
  size = (1, 2 * width + 1, 2 * width + 1)
  high = ndimage.maximum_filter(labels, size=size, mode="nearest")
  low = ndimage.minimum_filter(labels, size=size, mode="nearest")
  return (((high > 0) & (high != low)) | _z_contacts(labels)).astype(np.uint8)


def make_targets(labels: np.ndarray, contour_width: int = 2) -> np.ndarray:
  """Targets [depth, height, width, 2] float32: (mask, contour) in {0, 1}."""
  if labels.dtype.kind not in "ui":
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  separated = separate_touching(labels)
  mask = (separated > 0).astype(np.float32)
  contour = instance_contour(labels, contour_width).astype(np.float32)
  return np.stack([mask, contour], axis=-1)
