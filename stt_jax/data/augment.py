"""Host-side (numpy) augmentations applied to image and labels together.

They run on the host because they act on the integer labels too, from which the
targets are recomputed afterwards; they are cheap relative to a train step.
Every geometric transform is applied identically to image and labels.
"""

from __future__ import annotations

import numpy as np


def flip_transpose(image: np.ndarray, labels: np.ndarray,
                   rng: np.random.Generator, *, flip_z: bool = True,
                   flip_yx: bool = True, transpose_xy: bool = True):
  """Random flips along z/y/x and a random y<->x transpose (the dihedral group
  of the square in-plane, times a z flip). Arrays are [depth, height, width]."""
  if flip_z and rng.uniform() < 0.5:
    image, labels = image[::-1], labels[::-1]
  if flip_yx and rng.uniform() < 0.5:
    image, labels = image[:, ::-1], labels[:, ::-1]
  if flip_yx and rng.uniform() < 0.5:
    image, labels = image[:, :, ::-1], labels[:, :, ::-1]
  if transpose_xy and image.shape[1] == image.shape[2] and rng.uniform() < 0.5:
    image, labels = image.transpose(0, 2, 1), labels.transpose(0, 2, 1)
  return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def intensity(image: np.ndarray, rng: np.random.Generator, *,
              contrast: float = 0.3, brightness: float = 0.3,
              gamma_log2: float = 1.0) -> np.ndarray:
  """Random contrast/brightness/gamma on a float image in [0, 1] (3D, whole patch)."""
  image = image * (1 + rng.uniform(-contrast, contrast))
  image = image + rng.uniform(-brightness, brightness) * 0.5
  image = np.clip(image, 0, 1) ** (2.0 ** rng.uniform(-gamma_log2, gamma_log2))
  return image.astype(np.float32)
