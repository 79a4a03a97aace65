import json
import os

import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.errors import UserError


def test_round_trip_with_regions_and_voxel_size(tmp_path):
  data = np.random.default_rng(0).integers(0, 2**31, (5, 40, 33)).astype(np.uint32)
  path = str(tmp_path / "v.zarr")
  sources.write_array(path, data, voxel_size_nm=(30, 8, 8))
  vol = sources.open_volume(path)
  assert vol.shape == data.shape and vol.dtype == np.uint32
  assert vol.voxel_size_nm == (30.0, 8.0, 8.0)
  np.testing.assert_array_equal(vol.read([1, 3, 5], [2, 20, 11]), data[1:3, 3:23, 5:16])
  with open(os.path.join(path, "zarr.json")) as f:
    assert json.load(f)["dimension_names"] == ["z", "y", "x"]


def test_out_of_bounds_read_is_refused(tmp_path):
  path = str(tmp_path / "v.zarr")
  sources.write_array(path, np.zeros((2, 4, 4), np.uint8))
  with pytest.raises(ValueError, match="leaves"):
    sources.open_volume(path).read([0, 0, 2], [2, 4, 4])


def test_missing_and_not_zarr(tmp_path):
  with pytest.raises(UserError, match="not found"):
    sources.open_volume(str(tmp_path / "nope.zarr"))
  (tmp_path / "plain").mkdir()
  with pytest.raises(UserError, match="is not a volume"):
    sources.open_volume(str(tmp_path / "plain"))


def test_existing_volume_is_not_overwritten(tmp_path):
  path = str(tmp_path / "v.zarr")
  sources.write_array(path, np.ones((2, 4, 4), np.uint8))
  with pytest.raises(UserError, match="--overwrite"):
    sources.write_array(path, np.zeros((2, 4, 4), np.uint8))
  np.testing.assert_array_equal(sources.open_volume(path).read([0, 0, 0], [2, 4, 4]), 1)
  sources.write_array(path, np.zeros((2, 4, 4), np.uint8), overwrite=True)
  assert sources.open_volume(path).read([0, 0, 0], [2, 4, 4]).max() == 0


def test_mask_labels_are_global_components_and_survive_concurrent_reads(tmp_path):
  """Binary masks (data.label_kind='mask'): >= threshold is foreground, 3D
  6-connected components are instances (scipy as reference). Many reads at
  once, the first of them labelling the volume, must not deadlock the
  shared reader pool."""
  from scipy import ndimage
  rng = np.random.default_rng(0)
  mask = np.where(ndimage.gaussian_filter(rng.random((12, 64, 64)), 2) > 0.52, 255, 0)
  mask = mask.astype(np.uint8)
  mask[mask == 0] = rng.integers(0, 100, (mask == 0).sum())  # grey edges below 128
  base = sources.write_array(str(tmp_path / "m.zarr"), mask)
  vol = sources.MaskInstancesVolume(base, 128)
  futures = [vol.read_async([z % 8, 0, 0], [4, 64, 64]) for z in range(64)]
  parts = [f.result(timeout=60) for f in futures]
  labels = vol.read([0, 0, 0], vol.shape)
  reference, count = ndimage.label(mask >= 128)
  assert vol.dtype == np.uint32 and labels.max() == count > 3
  pairs = np.unique(np.stack([labels[labels > 0], reference[reference > 0]], 1), axis=0)
  assert len(pairs) == count and np.array_equal(labels > 0, mask >= 128)
  np.testing.assert_array_equal(parts[9], labels[1:5])
