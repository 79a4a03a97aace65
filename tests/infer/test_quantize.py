"""The uint8 probability encoding against float arithmetic."""

import numpy as np
import pytest

from stt_jax.infer.quantize import as_uint8, level


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.5, 0.85, 0.9, 0.95, 0.99, 1.0,
                                       0.1 + 0.2, 1 / 3, 51 / 255])
def test_level_selects_the_values_above_the_threshold(threshold):
  stored = np.arange(256)
  np.testing.assert_array_equal(stored > level(threshold), stored / 255.0 > threshold)


def test_level_on_a_fine_grid_of_thresholds():
  stored = np.arange(256)
  for threshold in np.linspace(0.0, 1.0, 2001):
    assert np.array_equal(stored > level(threshold), stored / 255.0 > threshold), threshold


def test_as_uint8_rounds_to_nearest_and_clips():
  probabilities = np.array([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 0.5, 1.0, -0.1, 1.2],
                           np.float32)
  expected = np.array([0, 0, 1, 2, 128, 255, 0, 255], np.uint8)  # 127.5 rounds to even
  got = as_uint8(probabilities)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)
  stored = np.arange(256, dtype=np.uint8)
  assert as_uint8(stored) is stored
  np.testing.assert_array_equal(as_uint8(stored / 255.0), stored)
