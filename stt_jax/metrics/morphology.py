"""Per-instance morphology of a label volume, computed block by block.

Per id: voxel count, volume (µm³, from the voxel size), bounding box
(voxels, [start, stop)), centroid (nm), surface area (µm², marching cubes on
the instance's own crop at the 0.5 level, anisotropic spacing), elongation
(sqrt of the largest over the smallest eigenvalue of the coordinate
covariance in nm², each voxel counted as a uniform box so a single voxel is
finite). Counts, boxes and moments are merged across blocks (Chan's pairwise
update, so large coordinates lose no precision); the surface needs the whole
object: measured from the block that holds it, or from its own box when it
crosses a block face.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure

COLUMNS = ("id", "voxels", "volume_um3", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1",
           "bbox_y1", "bbox_x1", "centroid_z_nm", "centroid_y_nm", "centroid_x_nm",
           "surface_um2", "elongation")
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class _Moments:
  """Running count, mean and scatter matrix per id (voxel units)."""

  def __init__(self):
    self.n = np.zeros(1)
    self.mean = np.zeros((1, 3))
    self.m2 = np.zeros((1, 6))
    self.lo = np.full((1, 3), np.iinfo(np.int64).max)
    self.hi = np.zeros((1, 3), np.int64)

  def _grow(self, size: int) -> None:
    if size <= len(self.n):
      return
    extra = size - len(self.n)
    self.n = np.concatenate([self.n, np.zeros(extra)])
    self.mean = np.concatenate([self.mean, np.zeros((extra, 3))])
    self.m2 = np.concatenate([self.m2, np.zeros((extra, 6))])
    self.lo = np.concatenate([self.lo, np.full((extra, 3), np.iinfo(np.int64).max)])
    self.hi = np.concatenate([self.hi, np.zeros((extra, 3), np.int64)])

  def add(self, labels: np.ndarray, start: Sequence[int]) -> None:
    top = int(labels.max(initial=0))
    if top == 0:
      return
    self._grow(top + 1)
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64)
    coords = np.unravel_index(flat, labels.shape)
    n_b = np.bincount(ids, minlength=top + 1).astype(np.float64)
    present = np.flatnonzero(n_b)
    safe = np.maximum(n_b, 1)
    mean_b = np.stack([np.bincount(ids, c, top + 1) / safe for c in coords], 1)
    m2_b = np.stack([np.bincount(ids, (coords[i] - mean_b[ids, i]) *
                                 (coords[j] - mean_b[ids, j]), top + 1)
                     for i, j in _PAIRS], 1)
    mean_b += np.asarray(start, np.float64)
    n_a, mean_a = self.n[present], self.mean[present]
    nb, mb = n_b[present], mean_b[present]
    total = n_a + nb
    delta = mb - mean_a
    cross = np.stack([delta[:, i] * delta[:, j] for i, j in _PAIRS], 1)
    self.m2[present] += m2_b[present] + cross * (n_a * nb / total)[:, None]
    self.mean[present] = mean_a + delta * (nb / total)[:, None]
    self.n[present] = total
    for label, box in enumerate(ndimage.find_objects(labels), 1):
      if box is not None:
        lo = [s.start + o for s, o in zip(box, start)]
        hi = [s.stop + o for s, o in zip(box, start)]
        self.lo[label] = np.minimum(self.lo[label], lo)
        self.hi[label] = np.maximum(self.hi[label], hi)


def _read(volume, start, stop) -> np.ndarray:
  if isinstance(volume, np.ndarray):
    return volume[tuple(slice(a, b) for a, b in zip(start, stop))]
  return volume.read(start, [b - a for a, b in zip(start, stop)])


def _surface_um2(crop: np.ndarray, spacing_um, slab: int = 8) -> float:
  """Marching-cubes area of a boolean crop holding the whole instance.

  Meshed in z-slabs sharing one plane: every cube lies in exactly one slab
  and its triangles depend only on its own corners, so the summed area is the
  whole mesh's, while memory stays that of one slab's mesh (a large, ragged
  instance's full mesh is tens of MB)."""
  padded = np.pad(np.asarray(crop, bool), 1)
  area = 0.0
  for z0 in range(0, padded.shape[0] - 1, slab):
    part = padded[z0:z0 + slab + 1]
    if part.all() or not part.any():  # no level crossing, no triangles
      continue
    verts, faces, _, _ = measure.marching_cubes(part.astype(np.float32), 0.5,
                                                spacing=spacing_um)
    area += measure.mesh_surface_area(verts, faces)
  return float(area)


def _surfaces(instances, grid, moments: "_Moments", spacing_um) -> np.ndarray:
  """Surface per id: instances whose box lies in one block are measured from
  that block (one read per block); the few that cross a face read their box."""
  present = np.flatnonzero(moments.n)
  surface = np.full(len(moments.n), np.nan)
  lo, hi = moments.lo[present], moments.hi[present]
  for b in grid:
    inside = present[np.all((lo >= b.start) & (hi <= b.stop), axis=1)]
    if not len(inside):
      continue
    data = np.asarray(_read(instances, b.start, b.stop))
    for label in inside:
      box = tuple(slice(a - o, z - o) for a, z, o in
                  zip(moments.lo[label], moments.hi[label], b.start))
      surface[label] = _surface_um2(data[box] == label, spacing_um)
  for label in present[np.isnan(surface[present])]:
    crop = _read(instances, moments.lo[label], moments.hi[label]) == label
    surface[label] = _surface_um2(crop, spacing_um)
  return surface


def measure_instances(instances, voxel_size_nm: Sequence[float],
                      block: Sequence[int] = (64, 512, 512)) -> list[dict]:
  """One row (dict of COLUMNS) per instance id of `instances` (a numpy array
  or a data-layer Volume, [depth, height, width]), ids in increasing order."""
  return list(iter_instances(instances, voxel_size_nm, block))


def iter_instances(instances, voxel_size_nm: Sequence[float],
                   block: Sequence[int] = (64, 512, 512)):
  """`measure_instances` one row at a time (no list of rows in memory)."""
  from stt_jax.infer import blocks  # pylint: disable=g-import-not-at-top
  shape = tuple(instances.shape)
  moments = _Moments()
  grid = list(blocks.iterate(shape, block))
  for b in grid:
    moments.add(np.asarray(_read(instances, b.start, b.stop)), b.start)
  voxel = np.asarray(voxel_size_nm, np.float64)
  spacing_um = tuple(voxel / 1000.0)
  surface = _surfaces(instances, grid, moments, spacing_um)
  for label in np.flatnonzero(moments.n):
    n = moments.n[label]
    cov = np.zeros((3, 3))
    for k, (i, j) in enumerate(_PAIRS):
      cov[i, j] = cov[j, i] = moments.m2[label, k] / n * voxel[i] * voxel[j]
    cov += np.diag(voxel ** 2 / 12.0)  # each voxel a uniform box
    eig = np.linalg.eigvalsh(cov)
    lo, hi = moments.lo[label], moments.hi[label]
    centroid = moments.mean[label] * voxel
    yield {
        "id": int(label), "voxels": int(n),
        "volume_um3": float(n * np.prod(voxel) / 1e9),
        **{f"bbox_{a}0": int(v) for a, v in zip("zyx", lo)},
        **{f"bbox_{a}1": int(v) for a, v in zip("zyx", hi)},
        **{f"centroid_{a}_nm": float(v) for a, v in zip("zyx", centroid)},
        "surface_um2": float(surface[label]),
        "elongation": float(np.sqrt(eig[-1] / eig[0])),
    }


def _summary(volumes: np.ndarray, surfaces: np.ndarray, elongations: np.ndarray) -> dict:
  if not len(volumes):
    return {"instances": 0}
  return {"instances": len(volumes), "total_volume_um3": float(volumes.sum()),
          "volume_um3_mean": float(volumes.mean()),
          "volume_um3_median": float(np.median(volumes)),
          "volume_um3_p05": float(np.percentile(volumes, 5)),
          "volume_um3_p95": float(np.percentile(volumes, 95)),
          "surface_um2_mean": float(surfaces.mean()),
          "elongation_median": float(np.median(elongations))}


def size_histogram_png(volumes: np.ndarray, path: str, bins: int = 30) -> None:
  """Histogram of instance volumes (µm³, log10 bins) as a PNG."""
  width, height, margin = 720, 400, 60
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  volumes = np.asarray(volumes, np.float64)
  draw.text((margin, 15), f"instance volumes (n = {len(volumes)})", fill="black")
  if len(volumes):
    logs = np.log10(volumes)
    lo, hi = float(logs.min()), float(logs.max())
    hi = hi if hi > lo else lo + 1.0
    counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    bar = plot_w / bins
    top = max(int(counts.max()), 1)
    for k, c in enumerate(counts):
      x0 = margin + k * bar
      y0 = height - margin - plot_h * c / top
      draw.rectangle([x0, y0, x0 + bar - 1, height - margin], fill=(70, 130, 180))
    for k in range(0, bins + 1, max(bins // 5, 1)):
      x = margin + k * bar
      draw.text((x - 15, height - margin + 8), f"{10 ** edges[k]:.2g}", fill="black")
    draw.text((width // 2 - 60, height - 25), "volume (um^3, log scale)", fill="black")
    draw.text((5, margin - 20), f"max {top}", fill="black")
  draw.line([margin, height - margin, width - margin, height - margin], fill="black")
  draw.line([margin, margin, margin, height - margin], fill="black")
  img.save(path)


def write_report(instances, voxel_size_nm: Sequence[float], out_dir: str,
                 block: Sequence[int] = (64, 512, 512)) -> dict:
  """morphology.csv, morphology_summary.json and size_histogram.png in
  `out_dir`; returns the summary."""
  columns = {"volume_um3": [], "surface_um2": [], "elongation": []}
  with open(os.path.join(out_dir, "morphology.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in iter_instances(instances, voxel_size_nm, block):
      writer.writerow(row)
      for key, values in columns.items():
        values.append(row[key])
  arrays = {k: np.array(v, np.float64) for k, v in columns.items()}
  summary = _summary(arrays["volume_um3"], arrays["surface_um2"], arrays["elongation"])
  summary["voxel_size_nm"] = [float(v) for v in voxel_size_nm]
  with open(os.path.join(out_dir, "morphology_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  size_histogram_png(arrays["volume_um3"], os.path.join(out_dir, "size_histogram.png"))
  return summary
