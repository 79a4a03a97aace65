"""Rescaling 16-bit / float images to uint8: the mapping against plain Python
arithmetic, `auto`'s sampled percentiles against the whole volume's, and the
`--mode=convert --intensity_range` command line against both."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from stt_jax.data import datasets, intensity, sources
from stt_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reference_uint8(v: float, low: float, high: float) -> int:
  """One value, in float64 Python arithmetic; round() is half to even like np.rint."""
  if v != v:
    return 0
  return int(min(255, max(0, round((v - low) * 255 / (high - low)))))


def test_mapping_is_linear_clipped_and_rounds_half_to_even():
  low, high = -100.0, 410.0  # 255 / 510 = 0.5 exactly: halves stay halves in float32
  values = np.array([-30000, -101, -100, -99, -97, 0, 155, 309, 409, 410, 411, 30000],
                    np.int16)
  got = intensity.to_uint8(values, low, high)
  assert got.dtype == np.uint8
  assert got.tolist() == [_reference_uint8(float(v), low, high) for v in values]
  # -99 -> 0.5 -> 0 and -97 -> 1.5 -> 2 (half to even); 0 -> 50; ends clip
  assert got.tolist() == [0, 0, 0, 0, 2, 50, 128, 204, 254, 255, 255, 255]
  floats = np.array([[np.nan, 0.25], [0.5, 1.0]], np.float32)
  assert intensity.to_uint8(floats, 0.0, 1.0).tolist() == [
      [0, _reference_uint8(0.25, 0, 1)], [_reference_uint8(0.5, 0, 1), 255]]


def test_parse_range():
  assert intensity.parse_range("auto") is None
  assert intensity.parse_range(" AUTO ") is None
  assert intensity.parse_range("1200,9800") == (1200.0, 9800.0)
  assert intensity.parse_range("-0.5,1e3") == (-0.5, 1000.0)
  for bad in ("9800,1200", "3,3", "1,nan", "1", "1,2,3", "low,high", ""):
    with pytest.raises(UserError, match="--intensity_range"):
      intensity.parse_range(bad)


class _CountingVolume(sources.Volume):
  """An in-memory volume that records the boxes read."""

  def __init__(self, array):
    self.array, self.path, self.boxes = array, "<memory>", []

  @property
  def shape(self):
    return self.array.shape

  @property
  def dtype(self):
    return self.array.dtype

  def _read_box(self, box):
    self.boxes.append(tuple((b.start, b.stop) for b in box))
    return self.array[tuple(box)].copy()


def test_auto_range_samples_boxes_spread_over_z_and_matches_the_volume():
  rng = np.random.default_rng(3)
  # 16-bit FIB-SEM-like: tissue around 5000 +- 800, a few saturated outliers
  array = np.clip(rng.normal(5000, 800, (80, 300, 300)), 0, 65535).astype(np.uint16)
  array[rng.random(array.shape) < 1e-4] = 65535
  volume = _CountingVolume(array)
  (low, high), what = intensity.sample_range(volume, boxes=40, box_size=100)
  # 40 single-section boxes of 100 x 100, z spread evenly from the first section to the last
  assert len(volume.boxes) == 40 and "40 boxes of 100x100 pixels over 40 section(s)" in what
  zs = [z for (z, _), _, _ in volume.boxes]
  assert zs[0] == 0 and zs[-1] == 79 and zs == sorted(set(zs))
  assert all(z1 - z0 == 1 and y1 - y0 == 100 and x1 - x0 == 100
             for (z0, z1), (y0, y1), (x0, x1) in volume.boxes)
  assert len({(y0, x0) for _, (y0, _), (x0, _) in volume.boxes}) > 30  # random in-plane
  exact_low, exact_high = np.percentile(array, intensity.AUTO_PERCENTILES)
  # 400,000 samples: the 0.5 % tails are known to a few grey levels
  assert abs(low - exact_low) < 15 and abs(high - exact_high) < 15
  assert high < 65535  # the outliers do not set the range
  # boxes as large as the sections: each section read once, the sample is the volume
  small = _CountingVolume(array[:5, :40, :60])
  (low, high), what = intensity.sample_range(small)
  assert len(small.boxes) == 5 and "5 boxes of 40x60 pixels over 5 section(s)" in what
  np.testing.assert_allclose([low, high], np.percentile(array[:5, :40, :60], [0.5, 99.5]))


def test_auto_range_ignores_nan_and_refuses_a_flat_volume():
  array = np.full((4, 20, 20), np.nan, np.float32)
  array[:, :10] = np.linspace(0, 1, 4 * 10 * 20, dtype=np.float32).reshape(4, 10, 20)
  (low, high), _ = intensity.sample_range(_CountingVolume(array))
  finite = array[np.isfinite(array)]
  np.testing.assert_allclose([low, high], np.percentile(finite, [0.5, 99.5]), rtol=1e-6)
  with pytest.raises(UserError, match="flat"):
    intensity.sample_range(_CountingVolume(np.full((3, 8, 8), 7, np.uint16)))
  with pytest.raises(UserError, match="no finite value"):
    intensity.sample_range(_CountingVolume(np.full((3, 8, 8), np.nan, np.float32)))


def test_convert_rescales_a_16_bit_stack_that_training_refuses(tmp_path):
  import tifffile
  rng = np.random.default_rng(0)
  stack16 = rng.integers(1000, 9000, (6, 40, 48)).astype(np.uint16)
  path = str(tmp_path / "fibsem16.tif")
  tifffile.imwrite(path, stack16)
  with pytest.raises(UserError, match=r"uint16.*--mode=convert .*--intensity_range=auto"):
    datasets.check_image(sources.open_volume(path), "data.train.image")

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  def convert(out, value_range):
    return subprocess.run(
        [sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py", "--mode=convert",
         f"--input={path}", f"--output={out}", f"--intensity_range={value_range}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

  auto = convert(tmp_path / "auto.zarr", "auto")
  assert auto.returncode == 0, auto.stderr[-2000:]
  printed = re.search(r"--intensity_range=([-\d.e+]+),([-\d.e+]+)", auto.stdout)
  low, high = float(printed.group(1)), float(printed.group(2))
  # 6 sections of 40 x 48, each a box: the sample is the volume
  np.testing.assert_allclose([low, high], np.percentile(stack16, [0.5, 99.5]), rtol=1e-5)
  got = sources.open_volume(str(tmp_path / "auto.zarr"))
  assert got.dtype == np.uint8 and got.shape == stack16.shape
  want = np.vectorize(lambda v: _reference_uint8(float(v), low, high))(stack16)
  # the printed range has 6 significant digits: a value at a rounding edge may move by 1
  assert np.abs(got.read([0, 0, 0], got.shape).astype(int) - want).max() <= 1
  datasets.check_image(got, "data.train.image")  # now accepted

  # a span of 255 x 32: the scale 1/32 is exact in float32, so are the halves
  explicit = convert(tmp_path / "explicit.zarr", "1000,9160")
  assert explicit.returncode == 0, explicit.stderr[-2000:]
  got = sources.open_volume(str(tmp_path / "explicit.zarr")).read([0, 0, 0], stack16.shape)
  want = np.vectorize(lambda v: _reference_uint8(float(v), 1000, 9160))(stack16)
  np.testing.assert_array_equal(got, want)

  again = convert(tmp_path / "auto.zarr", "auto")  # refused before any sampling
  lines = [l for l in again.stderr.strip().splitlines() if l.strip()]
  assert again.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0]
  assert "intensity range" not in again.stdout

  bad = convert(tmp_path / "bad.zarr", "9000,1000")
  lines = [l for l in bad.stderr.strip().splitlines() if l.strip()]
  assert bad.returncode == 2 and len(lines) == 1 and "low < high" in lines[0], bad.stderr
  assert not os.path.exists(tmp_path / "bad.zarr")
