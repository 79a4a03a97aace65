"""Deterministic synthetic EM volumes with mitochondria instance labels.

The demo's data and every test's fixture. What it draws, in xy-pixel units
(z voxels are `anisotropy` times thicker than x/y voxels, as in ssTEM/mbSEM):

* mitochondria: curved tubes (quadratic Bezier centre lines, rounded ends),
  some placed so that they touch another one; a dark double membrane and a
  cristae texture (bands across the long axis) inside;
* clutter that looks similar but is not a mitochondrion: cell membranes (thin
  dark sheets), vesicles (small dark-rimmed spheres) and dark blobs (uniform,
  no membrane, no cristae): what the paper's FG-BG adversarial loss targets;
* low-frequency shading, blur, Gaussian noise, per-section contrast jitter,
  and the odd blurred or missing (black) section.

Image `uint8` `[depth, height, width]`, labels `uint32` (0 = background).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import ndimage

from stt_jax.data import sources


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Parameters of a synthetic volume; all lengths in xy pixels."""
  shape: tuple[int, int, int] = (32, 256, 256)
  anisotropy: float = 4.0
  num_mitochondria: int = 70
  radius_range: tuple[float, float] = (5.0, 10.0)
  length_range: tuple[float, float] = (30.0, 90.0)
  touching_fraction: float = 0.3
  num_membranes: int = 2
  num_vesicles: int = 150
  num_dark_blobs: int = 30
  noise_sigma: float = 0.05
  missing_section_prob: float = 0.03
  blurred_section_prob: float = 0.03

  @classmethod
  def from_config(cls, cfg) -> "SyntheticSpec":
    """Builds a spec from a ConfigDict/dict with a subset of the fields."""
    values = dict(cfg)
    for key in ("shape", "radius_range", "length_range"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)


def _bezier(p0, p1, p2, num: int) -> np.ndarray:
  t = np.linspace(0.0, 1.0, num)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _distance_to_polyline(points: np.ndarray, line: np.ndarray):
  """Distance of `points` [n, 3] to a polyline [m, 3] and arc length there.

  Returns (distance [n], arc_length [n]).
  """
  a, b = line[:-1], line[1:]
  ab = b - a
  seg_len = np.linalg.norm(ab, axis=1)
  ap = points[:, None, :] - a[None]
  t = np.clip((ap * ab[None]).sum(-1) / np.maximum(seg_len ** 2, 1e-9), 0, 1)
  closest = a[None] + t[..., None] * ab[None]
  dist = np.linalg.norm(points[:, None, :] - closest, axis=-1)
  best = dist.argmin(1)
  rows = np.arange(len(points))
  arc_start = np.concatenate([[0.0], np.cumsum(seg_len)[:-1]])
  arc = arc_start[best] + t[rows, best] * seg_len[best]
  return dist[rows, best], arc


def _box_grid(lo, hi, shape, anisotropy):
  """Voxel indices inside the physical box [lo, hi] and their physical coords."""
  scale = np.array([anisotropy, 1.0, 1.0])
  lo_idx = np.maximum(np.floor(lo / scale).astype(int), 0)
  hi_idx = np.minimum(np.ceil(hi / scale).astype(int) + 1, np.array(shape))
  if np.any(hi_idx <= lo_idx):
    return None, None
  axes = [np.arange(l, h) for l, h in zip(lo_idx, hi_idx)]
  grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  return grid, grid * scale


def _smooth_noise(rng, shape, sigma_xy, anisotropy):
  field = rng.standard_normal(shape).astype(np.float32)
  field = ndimage.gaussian_filter(
      field, (max(sigma_xy / anisotropy, 0.5), sigma_xy, sigma_xy))
  return field / (field.std() + 1e-8)


def generate(spec: SyntheticSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws one volume. Same (spec, seed) gives the same arrays bit for bit.

  Returns:
    image: uint8 [depth, height, width]; labels: uint32 [depth, height, width].
  """
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in spec.shape)
  aniso = float(spec.anisotropy)
  extent = np.array(shape, float) * np.array([aniso, 1.0, 1.0])

  labels = np.zeros(shape, np.uint32)
  best_norm = np.full(shape, np.inf, np.float32)  # distance / radius of owner
  membrane = np.zeros(shape, np.float32)  # double-membrane darkness, 0..1
  cristae = np.zeros(shape, np.float32)   # cristae band brightness, 0..1
  centre_lines = []

  for instance in range(1, spec.num_mitochondria + 1):
    radius = rng.uniform(*spec.radius_range)
    length = rng.uniform(*spec.length_range)
    direction = rng.standard_normal(3)
    direction[0] *= 0.35  # mostly in-plane, like the long mitochondria in EM
    direction /= np.linalg.norm(direction)
    if centre_lines and rng.uniform() < spec.touching_fraction:
      other_line, other_radius = centre_lines[rng.integers(len(centre_lines))]
      anchor = other_line[rng.integers(len(other_line))]
      side = np.cross(direction, rng.standard_normal(3))
      side /= np.linalg.norm(side) + 1e-9
      p0 = anchor + side * (other_radius + radius) * 0.95
    else:
      p0 = rng.uniform(0, 1, 3) * extent
    p2 = p0 + direction * length
    bend = rng.standard_normal(3) * length * 0.25
    bend[0] *= 0.35
    p1 = (p0 + p2) / 2 + bend
    line = _bezier(p0, p1, p2, 12)
    pad = radius + 1.0
    grid, coords = _box_grid(line.min(0) - pad, line.max(0) + pad, shape, aniso)
    if grid is None:
      continue
    dist, arc = _distance_to_polyline(coords, line)
    norm = dist / radius
    idx = tuple(grid.T)
    owns = (norm < 1.0) & (norm < best_norm[idx])
    if not owns.any():
      continue
    centre_lines.append((line, radius))
    own_idx = tuple(grid[owns].T)
    labels[own_idx] = instance
    best_norm[own_idx] = norm[owns]
    depth_in = radius - dist[owns]
    # two dark leaflets ~0.9 px thick with a lighter gap between them
    outer = np.exp(-((depth_in - 0.5) / 0.55) ** 2)
    inner = np.exp(-((depth_in - 2.0) / 0.55) ** 2)
    membrane[own_idx] = np.clip(outer + 0.8 * inner, 0, 1)
    period = rng.uniform(3.5, 5.5)
    phase = rng.uniform(0, 2 * np.pi)
    band = np.sin(2 * np.pi * arc[owns] / period + phase)
    cristae[own_idx] = np.clip((band - 0.3) / 0.7, 0, 1) * (depth_in > 2.5)

  labels = _relabel_sequential(labels)
  mito = labels > 0

  image = 0.64 + 0.05 * _smooth_noise(rng, shape, 10.0, aniso)

  # cell membranes: thin dark sheets along the zero set of a smooth field
  for _ in range(spec.num_membranes):
    field = _smooth_noise(rng, shape, rng.uniform(14, 28), aniso)
    sheet = np.exp(-(field / 0.045) ** 2) * ~mito
    image = image * (1 - 0.5 * sheet)

  _draw_spheres(rng, image, mito, spec.num_vesicles, (1.5, 3.5), aniso,
                rim_value=0.30, fill_value=0.58)
  _draw_spheres(rng, image, mito, spec.num_dark_blobs, (4.0, 9.0), aniso,
                rim_value=None, fill_value=0.36)

  matrix = 0.44 + 0.02 * _smooth_noise(rng, shape, 3.0, aniso)
  mito_img = matrix + 0.14 * cristae
  mito_img = mito_img * (1 - 0.62 * membrane)
  image = np.where(mito, mito_img, image)

  image = ndimage.gaussian_filter(image, (0.3, 0.7, 0.7))
  image = image + spec.noise_sigma * rng.standard_normal(shape)
  gain = rng.uniform(0.9, 1.1, (shape[0], 1, 1))
  bias = rng.uniform(-0.04, 0.04, (shape[0], 1, 1))
  image = image * gain + bias
  for z in range(shape[0]):
    if rng.uniform() < spec.blurred_section_prob:
      image[z] = ndimage.gaussian_filter(image[z], 2.5)
    elif rng.uniform() < spec.missing_section_prob:
      image[z] = 0.0
  image_u8 = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return image_u8, labels


def _draw_spheres(rng, image, mito, count, radius_range, aniso, rim_value,
                  fill_value) -> None:
  """Paints spheres into `image` (in place), outside mitochondria only."""
  shape = image.shape
  extent = np.array(shape, float) * np.array([aniso, 1.0, 1.0])
  for _ in range(count):
    radius = rng.uniform(*radius_range)
    centre = rng.uniform(0, 1, 3) * extent
    stretch = rng.uniform(0.7, 1.4, 3)
    grid, coords = _box_grid(centre - radius * 1.6, centre + radius * 1.6,
                             shape, aniso)
    if grid is None:
      continue
    r = np.linalg.norm((coords - centre) / stretch, axis=1)
    idx = tuple(grid.T)
    free = ~mito[idx]
    inside = (r < radius) & free
    if rim_value is None:
      soft = np.clip(radius - r, 0, 1) * free
      image[idx] = image[idx] * (1 - soft) + fill_value * soft
    else:
      image[tuple(grid[inside].T)] = fill_value
      rim = np.exp(-((r - radius) / 0.6) ** 2) * free
      image[idx] = image[idx] * (1 - rim) + rim_value * rim


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
  ids = np.unique(labels)
  ids = ids[ids > 0]
  lut = np.zeros(int(labels.max()) + 1, np.uint32)
  lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
  return lut[labels]


def write_volume_pair(directory: str, spec: SyntheticSpec, seed: int,
                      voxel_size_nm=(30.0, 8.0, 8.0)) -> dict[str, str]:
  """Generates a volume and writes `image.zarr` and `labels.zarr` under it.

  Returns {"image": path, "label": path}.
  """
  image, labels = generate(spec, seed)
  os.makedirs(directory, exist_ok=True)
  paths = {"image": os.path.join(directory, "image.zarr"),
           "label": os.path.join(directory, "labels.zarr")}
  sources.write_array(paths["image"], image, voxel_size_nm=voxel_size_nm)
  sources.write_array(paths["label"], labels, voxel_size_nm=voxel_size_nm)
  return paths
