import collections
import itertools

import numpy as np
import pytest
from scipy import ndimage

from stt_jax.data import rescaled, sources


def _reference_bins(data: np.ndarray, factors, reduce: str) -> np.ndarray:
  """Bin by bin, with Python's Counter for the mode: the independent answer."""
  shape = [-(-n // f) for n, f in zip(data.shape[:3], factors)]
  out = np.zeros(shape + list(data.shape[3:]), data.dtype)
  for index in itertools.product(*(range(n) for n in shape)):
    box = tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))
    values = data[box]
    if reduce == "mean":
      mean = values.reshape(-1, *data.shape[3:]).astype(np.float64).mean(axis=0)
      out[index] = np.rint(mean) if np.issubdtype(data.dtype, np.integer) else mean
      continue
    # the mode counts the volume's last voxels again for missing ones (edge padding)
    padded = np.pad(values, [(0, f - n) for f, n in zip(factors, values.shape)], mode="edge")
    counts = collections.Counter(padded.ravel().tolist())
    out[index] = min(counts, key=lambda v: (-counts[v], v == 0, v))
  return out


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 3, 2), (1, 1, 4)])
def test_binned_mean_equals_bin_by_bin_means(tmp_path, factors):
  data = np.random.default_rng(0).integers(0, 256, (5, 13, 11)).astype(np.uint8)
  path = str(tmp_path / "image.zarr")
  sources.write_array(path, data, voxel_size_nm=(30, 4, 4))
  binned = rescaled.BinnedVolume(sources.open_volume(path), factors, "mean")
  want = _reference_bins(data, factors, "mean")
  assert binned.shape == want.shape and binned.dtype == np.uint8
  assert binned.voxel_size_nm == tuple(s * f for s, f in zip((30, 4, 4), factors))
  np.testing.assert_array_equal(binned.read([0, 0, 0], binned.shape), want)
  # an inner box (the sampler's reads) sees the same bins
  np.testing.assert_array_equal(binned.read([1, 2, 1], [2, 3, 2]), want[1:3, 2:5, 1:3])


def test_binned_mode_keeps_ids_and_breaks_ties_for_objects(tmp_path):
  rng = np.random.default_rng(1)
  data = rng.choice(np.array([0, 0, 3, 7, 9], np.uint32), size=(4, 9, 10))
  path = str(tmp_path / "labels.zarr")
  sources.write_array(path, data)
  for factors in ((1, 2, 2), (2, 2, 3)):
    binned = rescaled.BinnedVolume(sources.open_volume(path), factors, "mode")
    np.testing.assert_array_equal(binned.read([0, 0, 0], binned.shape),
                                  _reference_bins(data, factors, "mode"))
  # mostly whole boxes of one id (the fast path) beside boundary ones
  blocks = np.kron(rng.choice(np.array([0, 0, 4, 6], np.uint32), size=(2, 4, 4)),
                   np.ones((2, 3, 3), np.uint32))
  blocks[rng.random(blocks.shape) < 0.1] = 5
  path = str(tmp_path / "blocks.zarr")
  sources.write_array(path, blocks)
  binned = rescaled.BinnedVolume(sources.open_volume(path), (1, 2, 2), "mode")
  np.testing.assert_array_equal(binned.read([0, 0, 0], binned.shape),
                                _reference_bins(blocks, (1, 2, 2), "mode"))
  # 2 object voxels against 2 background ones: the object; 1/1/1/1: the smaller id
  assert rescaled.block_mode(np.array([[0, 5, 0, 5], [0, 8, 4, 6]])).tolist() == [5, 4]


def test_binned_mean_of_a_float_image_is_not_rounded(tmp_path):
  data = np.random.default_rng(4).random((3, 7, 9)).astype(np.float32)
  path = str(tmp_path / "float.zarr")
  sources.write_array(path, data)
  binned = rescaled.BinnedVolume(sources.open_volume(path), (1, 2, 2), "mean")
  np.testing.assert_allclose(binned.read([0, 0, 0], binned.shape),
                             _reference_bins(data, (1, 2, 2), "mean"), rtol=1e-6)


def test_binned_channels_and_regions(tmp_path):
  data = np.random.default_rng(2).integers(0, 256, (3, 8, 7, 2)).astype(np.uint8)
  path = str(tmp_path / "c.zarr")
  sources.write_array(path, data)
  region = sources.RegionVolume(sources.open_volume(path), (1, 1, 0), (3, 8, 7))
  binned = rescaled.BinnedVolume(region, (1, 2, 2), "mean")
  np.testing.assert_array_equal(binned.read([0, 0, 0, 0], binned.shape),
                                _reference_bins(data[1:3, 1:8, 0:7], (1, 2, 2), "mean"))


@pytest.mark.parametrize("factors,origin", [((1, 2, 2), (0, 0, 0)), ((2, 3, 2), (1, 2, 0)),
                                            ((1, 4, 1), (0, 3, 0))])
def test_upsampled_equals_scipy_linear_interpolation(tmp_path, factors, origin):
  fine_shape = (19, 17, 9)  # more sections than one slab of interpolation
  coarse_shape = rescaled.binned_shape([n + o for n, o in zip(fine_shape, origin)], factors)
  coarse = np.random.default_rng(3).random((*coarse_shape, 2)).astype(np.float32)
  path = str(tmp_path / "p.zarr")
  sources.write_array(path, coarse)
  view = rescaled.UpsampledVolume(sources.open_volume(path), factors, fine_shape, origin)
  assert view.shape == (*fine_shape, 2)
  grid = np.meshgrid(*((np.arange(n) + o + 0.5) / f - 0.5
                       for n, f, o in zip(fine_shape, factors, origin)), indexing="ij")
  want = np.stack([ndimage.map_coordinates(coarse[..., c], grid, order=1, mode="nearest")
                   for c in range(2)], axis=-1)
  np.testing.assert_allclose(view.read([0, 0, 0, 0], view.shape), want, atol=1e-6)
  np.testing.assert_allclose(view.read([2, 5, 3, 1], [3, 9, 4, 1]), want[2:5, 5:14, 3:7, 1:2],
                             atol=1e-6)
  np.testing.assert_allclose(view.read([5, 0, 0, 0], [12, 17, 9, 1]), want[5:17, ..., :1],
                             atol=1e-6)


def test_uint8_probabilities_round_and_reopen_at_full_resolution(tmp_path):
  coarse = np.random.default_rng(4).integers(0, 256, (2, 5, 4, 2)).astype(np.uint8)
  path = str(tmp_path / "probabilities.zarr")
  sources.create_volume(path, coarse.shape, np.uint8, voxel_size_nm=(50, 9.2, 9.2),
                        attributes=rescaled.full_resolution_attributes(
                            (2, 10, 7), (1, 2, 2), (0, 0, 0), (50, 4.6, 4.6))
                        ).write([0, 0, 0, 0], coarse)
  view = rescaled.full_resolution(sources.open_volume(path))
  assert isinstance(view, rescaled.UpsampledVolume)
  assert view.shape == (2, 10, 7, 2) and view.voxel_size_nm == (50.0, 4.6, 4.6)
  grid = np.meshgrid(np.arange(2), *((np.arange(n) + 0.5) / 2 - 0.5 for n in (10, 7)),
                     indexing="ij")
  want = np.stack([ndimage.map_coordinates(coarse[..., c].astype(np.float64), grid, order=1,
                                           mode="nearest") for c in range(2)], axis=-1)
  got = view.read([0, 0, 0, 0], view.shape)
  assert got.dtype == np.uint8
  # rounding of the same value in float32 and float64 may differ at exact halves
  assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-4
  plain = str(tmp_path / "plain.zarr")
  sources.write_array(plain, coarse)
  assert not isinstance(rescaled.full_resolution(sources.open_volume(plain)),
                        rescaled.UpsampledVolume)


def test_a_coarse_array_of_the_wrong_shape_is_refused(tmp_path):
  path = str(tmp_path / "p.zarr")
  sources.write_array(path, np.zeros((2, 5, 4), np.uint8))
  with pytest.raises(ValueError, match="does not cover"):
    rescaled.UpsampledVolume(sources.open_volume(path), (1, 2, 2), (2, 12, 8))
