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


def intensity(image: np.ndarray, rng: np.random.Generator, *,
              contrast: float = 0.3, brightness: float = 0.3,
              gamma_log2: float = 1.0) -> np.ndarray:
  """Random contrast/brightness/gamma on a float image in [0, 1] (3D, whole
  patch), in the ELEKTRONN/pytorch_connectomics convention: a factor f moves
  its quantity by up to +-f/2 (x(1 +- 0.15), +-0.15 grey at the defaults)."""
  image = image * (1 + rng.uniform(-contrast, contrast) * 0.5)
  image = image + rng.uniform(-brightness, brightness) * 0.5
  image = np.clip(image, 0, 1) ** (2.0 ** rng.uniform(-gamma_log2, gamma_log2))
  return image.astype(np.float32)


# --- geometric: one coordinate map per slice, shared by image and labels -----
#
# The sampler reads each patch with `in_plane_margin` extra pixels on every
# in-plane side; the map sends the patch's pixels into that larger read, so a
# zoom-out, the elastic field and a misalignment shift pull in the tissue that
# really lies beyond the patch (no mirrored or wrapped-around content), and the
# three transforms cost one interpolation per slice instead of one each.


def elastic_rms(alpha: float, sigma: float) -> float:
  """RMS displacement (pixels) of `elastic_field`: uniform noise on [-1, 1]
  (std 1/sqrt(3)) smoothed by a 2D Gaussian, which divides a white field's
  spread by 2*sqrt(pi)*sigma, times alpha (0.65 px at alpha 16, sigma 4)."""
  return alpha * np.sqrt(1 / 3) / (2 * np.sqrt(np.pi) * sigma)


def in_plane_margin(cfg, patch_height_width) -> int:
  """Pixels to read beyond each in-plane side of a patch for the geometric
  transforms `cfg` (config.data.augment) can draw: how far the strongest
  zoom-out (and, with rotation, the patch's corners turned onto an axis)
  reaches beyond the patch, plus 4x the elastic RMS displacement (scaled by
  the zoom like every displacement), plus the largest misalignment shift."""
  if cfg is None or not cfg.enabled:
    return 0
  half_h, half_w = (n / 2.0 for n in patch_height_width)
  zoom_out = 1.0
  if cfg.get("rescale_prob", 0.0) > 0:
    zoom_out = max(1.0, 1.0 / cfg.rescale_range[0])
  if cfg.get("rotate_prob", 0.0) > 0:
    # a corner at radius r turned onto an axis reaches r from the centre
    reach = np.hypot(half_h, half_w) * zoom_out - min(half_h, half_w)
  else:
    reach = max(half_h, half_w) * (zoom_out - 1.0)
  if cfg.get("elastic_prob", 0.0) > 0:
    reach += 4 * elastic_rms(cfg.elastic_alpha, cfg.elastic_sigma) * zoom_out
  if cfg.get("misalignment_prob", 0.0) > 0:
    reach += cfg.misalignment_max_shift
  return int(np.ceil(reach))


def elastic_field(shape, rng: np.random.Generator, *, alpha: float = 16.0,
                  sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
  """In-plane displacement (dy, dx) [height, width] of Simard et al. (2003):
  uniform noise in [-1, 1] smoothed by a Gaussian of `sigma` pixels, times
  `alpha`, never rescaled. Smoothing divides the noise's spread (see
  `elastic_rms`), so alpha 16, sigma 4 moves pixels by 0.65 px RMS, ~2 px at
  most: pytorch_connectomics' field. (A field rescaled to reach alpha pixels
  at sigma 4 folds tissue into marbling no microscope produces; ours did that
  until the VNC III batches were looked at.)"""
  return tuple(alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma)
               for _ in range(2))


def sampling_grid(depth: int, height: int, width: int, rng: np.random.Generator, *,
                  scale_range=None, rotation_range=None, elastic=None,
                  misalignment_shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Where each output pixel of `warp_crop` samples, relative to the patch's
  own top-left corner: (ys, xs) [depth, height, width] float64.

  The elastic displacement moves the output grid; zoom (s > 1 magnifies) and
  rotation (degrees, counter-clockwise as displayed with y down, scipy's
  `ndimage.rotate` convention) act about the patch centre; misalignment then
  shifts whole slices. Draws from `rng` in that order, only what is asked.
  """
  yy, xx = np.meshgrid(np.arange(height, dtype=np.float64),
                       np.arange(width, dtype=np.float64), indexing="ij")
  if elastic is not None:
    dy, dx = elastic_field((height, width), rng, alpha=elastic[0], sigma=elastic[1])
    yy, xx = yy + dy, xx + dx
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  if scale_range is not None:
    scale = rng.uniform(*scale_range)
    yy, xx = cy + (yy - cy) / scale, cx + (xx - cx) / scale
  if rotation_range is not None:
    angle = np.deg2rad(rng.uniform(*rotation_range))
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = yy - cy, xx - cx
    yy, xx = cy + cos * u + sin * v, cx - sin * u + cos * v
  shifts = np.zeros((depth, 2))
  if misalignment_shift and depth > 1:
    start = int(rng.integers(1, depth))
    stop = depth if rng.uniform() < 0.5 else start + 1
    shifts[start:stop] = rng.integers(-misalignment_shift, misalignment_shift + 1, size=2)
  # a slice shifted by (sy, sx) shows at p what lay at p - (sy, sx)
  return yy[None] - shifts[:, 0, None, None], xx[None] - shifts[:, 1, None, None]


def warp_crop(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
              out_height_width, offset, scale_range=None, rotation_range=None,
              elastic=None, misalignment_shift: int = 0):
  """The patch at `offset` (y, x) of a larger read, zoomed, rotated,
  elastically deformed and misaligned, image and labels alike.

  image, labels [depth, height, width] (the read, patch plus margins); returns
  both [depth, *out_height_width]. scale_range (low, high): zoom by a random
  s about the patch centre (s > 1 magnifies); rotation_range (low, high):
  turn by a random angle in degrees about the patch centre; elastic (alpha,
  sigma): the `elastic_field`; misalignment_shift: the slices from a random z
  on (or just that one slice) shifted by a random in-plane offset up to this
  many pixels, the section misalignment of serial EM (`sampling_grid`). The
  image is sampled bilinearly, the labels by nearest neighbour, from the same
  coordinates (mirrored only where the read itself ends, at the volume's edge).
  """
  depth = image.shape[0]
  height, width = (int(n) for n in out_height_width)
  oy, ox = (int(n) for n in offset)
  if (scale_range is None and rotation_range is None and elastic is None
      and not misalignment_shift):
    return (np.ascontiguousarray(image[:, oy:oy + height, ox:ox + width]),
            np.ascontiguousarray(labels[:, oy:oy + height, ox:ox + width]))
  ys, xs = sampling_grid(depth, height, width, rng, scale_range=scale_range,
                         rotation_range=rotation_range, elastic=elastic,
                         misalignment_shift=misalignment_shift)
  out_image = np.empty((depth, height, width), image.dtype)
  out_labels = np.empty((depth, height, width), labels.dtype)
  for z in range(depth):
    grid = np.stack([ys[z] + oy, xs[z] + ox])
    out_image[z] = ndimage.map_coordinates(image[z], grid, order=1, mode="mirror")
    out_labels[z] = ndimage.map_coordinates(labels[z], grid, order=0, mode="mirror")
  return out_image, out_labels


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
