import csv
import json
import os

import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.metrics import morphology


def _two_objects():
  labels = np.zeros((20, 60, 70), np.uint32)
  zz, yy, xx = np.mgrid[:20, :60, :70]
  # a ball of radius 8 in nm-isotropic units (z voxels 2x thicker)
  ball = ((zz - 10) * 2.0) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 8 ** 2
  labels[ball] = 3
  labels[5:9, 40:44, 30:66] = 7   # a 4x4x36 rod along x
  return labels


def test_counts_boxes_centroids_against_numpy(tmp_path):
  labels = _two_objects()
  voxel = (10.0, 5.0, 5.0)
  vol = sources.write_array(str(tmp_path / "l.zarr"), labels)
  rows = {r["id"]: r for r in morphology.measure_instances(vol, voxel, block=(8, 16, 32))}
  assert sorted(rows) == [3, 7]
  for label, row in rows.items():
    where = np.argwhere(labels == label)
    assert row["voxels"] == len(where)
    assert row["volume_um3"] == pytest.approx(len(where) * 10 * 5 * 5 / 1e9)
    assert [row[f"bbox_{a}0"] for a in "zyx"] == list(where.min(0))
    assert [row[f"bbox_{a}1"] for a in "zyx"] == list(where.max(0) + 1)
    centroid = where.mean(0) * np.array(voxel)
    assert [row[f"centroid_{a}_nm"] for a in "zyx"] == pytest.approx(list(centroid))
  # the ball: radius 8 voxels of 5 nm = 40 nm; marching cubes is within a few %
  area = 4 * np.pi * 0.040 ** 2
  assert rows[3]["surface_um2"] == pytest.approx(area, rel=0.08)
  assert rows[3]["elongation"] == pytest.approx(1.0, abs=0.1)
  # the rod: covariance of a box a x b x c is diag(a^2, b^2, c^2) / 12 (nm)
  expected = np.sqrt((36 * 5.0) ** 2 / (4 * 5.0) ** 2)
  assert rows[7]["elongation"] == pytest.approx(expected, rel=1e-6)


def test_report_files(tmp_path):
  summary = morphology.write_report(_two_objects(), (10.0, 5.0, 5.0), str(tmp_path))
  assert summary["instances"] == 2
  with open(tmp_path / "morphology.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["id"]) for r in rows] == [3, 7] and list(rows[0]) == list(morphology.COLUMNS)
  assert json.load(open(tmp_path / "morphology_summary.json"))["instances"] == 2
  assert os.path.getsize(tmp_path / "size_histogram.png") > 1000


def test_slabbed_surface_equals_whole_mesh():
  """The z-slab meshing sums to skimage's single mesh of the whole crop,
  for a ragged object whose slabs include empty and all-inside ones."""
  from scipy import ndimage
  from skimage import measure
  rng = np.random.default_rng(0)
  crop = ndimage.gaussian_filter(rng.random((37, 40, 33)), 2) > 0.5
  crop[10:20] = True  # slabs with no level crossing inside the crop
  spacing = (0.03, 0.008, 0.008)
  verts, faces, _, _ = measure.marching_cubes(np.pad(crop, 1).astype(np.float32), 0.5,
                                              spacing=spacing)
  whole = measure.mesh_surface_area(verts, faces)
  for slab in (1, 3, 8, 64):
    assert morphology._surface_um2(crop, spacing, slab=slab) == pytest.approx(whole, rel=1e-9)
