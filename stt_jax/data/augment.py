"""Host-side (numpy/scipy) augmentations, the MitoEM/pytorch_connectomics set.

They run on the host, in the sampler's threads, because the geometric ones act
on the integer instance labels too and the targets (mask, contour) are
recomputed from the transformed labels afterwards; the host keeps ahead of the
step on the patch sizes we train with (bench/data_throughput.py will show it).
Every geometric transform is applied identically to image and labels (tested);
the image-only ones model imaging defects and leave the labels alone.
Arrays are [depth, height, width]; images float in [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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


# --- geometric: one in-plane coordinate map shared by image and labels ------

def _warp(image: np.ndarray, labels: np.ndarray, coords_y: np.ndarray,
          coords_x: np.ndarray):
  """Samples every slice at (coords_y, coords_x) [height, width]: the image
  bilinearly, the labels by nearest neighbour, both reflected at the edges, so
  image and labels move together."""
  depth = image.shape[0]
  out_image = np.empty_like(image)
  out_labels = np.empty_like(labels)
  grid = np.stack([coords_y, coords_x])
  for z in range(depth):
    out_image[z] = ndimage.map_coordinates(image[z], grid, order=1, mode="mirror")
    out_labels[z] = ndimage.map_coordinates(labels[z], grid, order=0, mode="mirror")
  return out_image, out_labels


def rescale(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
            low: float = 0.8, high: float = 1.2):
  """In-plane zoom by s in [low, high] about the patch centre (same size out)."""
  scale = rng.uniform(low, high)
  h, w = image.shape[1:3]
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  return _warp(image, labels, cy + (yy - cy) / scale, cx + (xx - cx) / scale)


def elastic(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
            alpha: float = 16.0, sigma: float = 4.0):
  """In-plane elastic deformation: a random displacement field smoothed by a
  Gaussian of `sigma` pixels, scaled to `alpha` pixels, shared by all slices
  (z is too coarse for a 3D field), as pytorch_connectomics does."""
  h, w = image.shape[1:3]
  dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant")
  dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant")
  norm = max(np.abs(dy).max(), np.abs(dx).max(), 1e-12)
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  return _warp(image, labels, yy + alpha * dy / norm, xx + alpha * dx / norm)


def misalignment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                 max_shift: int = 8):
  """Shifts the slices from a random z on (or one slice) by a random in-plane
  offset, image and labels alike: the section misalignment of serial EM."""
  depth = image.shape[0]
  if depth < 2:
    return image, labels
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
  start = int(rng.integers(1, depth))
  stop = depth if rng.uniform() < 0.5 else start + 1
  image, labels = image.copy(), labels.copy()
  for z in range(start, stop):
    image[z] = np.roll(image[z], (dy, dx), axis=(0, 1))
    labels[z] = np.roll(labels[z], (dy, dx), axis=(0, 1))
  return image, labels


# --- image only: what the microscope does to the picture, not the tissue ------

def missing_section(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One slice of a float image lost (set to its mean grey); labels unchanged."""
  if image.shape[0] < 3:
    return image
  image = image.copy()
  z = int(rng.integers(1, image.shape[0] - 1))
  image[z] = image[z].mean()
  return image


def motion_blur(image: np.ndarray, rng: np.random.Generator, *, size: int = 9) -> np.ndarray:
  """One slice blurred along a random in-plane direction by a line kernel."""
  image = image.copy()
  z = int(rng.integers(0, image.shape[0]))
  kernel = np.zeros((size, size), np.float32)
  kernel[size // 2] = 1.0 / size
  kernel = ndimage.rotate(kernel, rng.uniform(0, 180), reshape=False, order=1)
  kernel /= max(kernel.sum(), 1e-12)
  image[z] = ndimage.convolve(image[z], kernel, mode="reflect")
  return image


def _random_box(shape, rng, fraction: float):
  size = [max(1, int(round(s * fraction))) for s in shape]
  start = [int(rng.integers(0, s - n + 1)) for s, n in zip(shape, size)]
  return tuple(slice(a, a + n) for a, n in zip(start, size))


def cut_blur(image: np.ndarray, rng: np.random.Generator, *, fraction: float = 0.4,
             factor: int = 4) -> np.ndarray:
  """A random box of every slice replaced by its down-then-up-sampled self."""
  image = image.copy()
  box = _random_box(image.shape[1:3], rng, fraction)
  region = image[:, box[0], box[1]]
  small = ndimage.zoom(region, (1, 1 / factor, 1 / factor), order=1)
  back = ndimage.zoom(small, np.array(region.shape) / np.array(small.shape), order=1)
  image[:, box[0], box[1]] = back[:, :region.shape[1], :region.shape[2]]
  return image


def cut_noise(image: np.ndarray, rng: np.random.Generator, *, fraction: float = 0.4,
              scale: float = 0.2) -> np.ndarray:
  """Gaussian noise of std `scale` added inside a random box, clipped to [0, 1]."""
  image = image.copy()
  box = (slice(None),) + _random_box(image.shape[1:3], rng, fraction)
  image[box] = np.clip(image[box] + rng.normal(0, scale, image[box].shape), 0, 1)
  return image
