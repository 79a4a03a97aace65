"""bench/attention_impl.py's gradient comparison: leaves whose gradient is
rounding noise (zero in exact arithmetic) must not decide it."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import attention_impl  # noqa: E402  pylint: disable=g-import-not-at-top


def test_noise_leaves_are_left_out_of_the_per_leaf_figure():
  reference = {"kernel": np.array([1.0, -2.0]), "key_bias": np.array([1e-10, -2e-10]),
               "small": np.array([1e-3, 0.0])}
  other = {"kernel": np.array([1.0, -2.004]), "key_bias": np.array([-1e-10, 2e-10]),
           "small": np.array([1.01e-3, 0.0])}
  out = attention_impl.gradient_difference(reference, other)
  assert out["grad_difference_of_largest"] == pytest.approx(0.004 / 2.0)
  # key_bias differs by 200 % of itself but is below the floor; "small" (5e-4
  # of the largest) is above it and differs by 1 % of itself: the worst leaf
  assert out["leaf"] == "['small']"
  assert out["leaf_grad_difference"] == pytest.approx(0.01)
