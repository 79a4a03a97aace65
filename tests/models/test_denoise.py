"""Interpolation front-end against numpy/scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from stt_jax.models.denoise import InterpolationDenoiser


def _volume(shape=(2, 5, 9, 11, 1), seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _neighbour_slices(x):
  """x [b, t, h, w] -> (previous, next) slices, the ends repeating themselves."""
  prev = np.concatenate([x[:, :1], x[:, :-1]], axis=1)
  nxt = np.concatenate([x[:, 1:], x[:, -1:]], axis=1)
  return prev, nxt


def _with_head(params, bias):
  """Parameters whose kernel head ignores the features and outputs `bias`."""
  p = jax.tree.map(lambda a: a, params)
  p["params"]["kernels"]["kernel"] = jnp.zeros_like(p["params"]["kernels"]["kernel"])
  p["params"]["kernels"]["bias"] = jnp.asarray(bias, jnp.float32)
  return p


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_fresh_front_end_is_a_gated_box_interpolation(kernel_size):
  # zero kernel head: uniform weights over both k x k neighbourhoods, gate sigmoid(-4)
  x = _volume()
  model = InterpolationDenoiser(kernel_size=kernel_size, features=4)
  params = model.init(jax.random.key(0), x)
  got = np.asarray(model.apply(params, x))[..., 0]
  prev, nxt = _neighbour_slices(x[..., 0].astype(np.float64))
  box = lambda v: ndimage.uniform_filter(v, size=(1, 1, kernel_size, kernel_size), mode="nearest")
  restored = 0.5 * (box(prev) + box(nxt))
  gate = 1 / (1 + np.exp(4.0))
  np.testing.assert_allclose(got, (1 - gate) * x[..., 0] + gate * restored, rtol=1e-5, atol=1e-6)


def test_kernels_select_taps_of_the_adjacent_slices():
  # an open gate and one dominant tap per slice: restored = 0.5 prev shifted + 0.5 next shifted
  k, x = 3, _volume(seed=1)
  model = InterpolationDenoiser(kernel_size=k, features=4)
  params = model.init(jax.random.key(0), x)
  bias = np.full(2 * k * k + 1, -30.0, np.float32)
  bias[0 * k + 1] = 30.0              # previous slice, tap (dy=-1, dx=0)
  bias[k * k + 1 * k + 2] = 30.0      # next slice, tap (dy=0, dx=+1)
  bias[-1] = 30.0                     # gate fully open
  got = np.asarray(model.apply(_with_head(params, bias), x))[..., 0]
  prev, nxt = _neighbour_slices(x[..., 0])
  prev_up = ndimage.shift(prev, (0, 0, 1, 0), order=0, mode="nearest")     # value from y-1
  next_left = ndimage.shift(nxt, (0, 0, 0, -1), order=0, mode="nearest")   # value from x+1
  np.testing.assert_allclose(got, 0.5 * prev_up + 0.5 * next_left, rtol=1e-5, atol=1e-6)


def test_a_missing_slice_is_rebuilt_from_its_neighbours_and_ends_use_themselves():
  k = 3
  x = _volume((1, 4, 8, 8, 1), seed=2)
  x[:, 2] = 0.0                                   # a missing section
  model = InterpolationDenoiser(kernel_size=k, features=4)
  params = model.init(jax.random.key(0), x)
  bias = np.full(2 * k * k + 1, -30.0, np.float32)
  centre = k * k // 2
  bias[centre] = bias[k * k + centre] = 30.0
  bias[-1] = 30.0
  got = np.asarray(model.apply(_with_head(params, bias), x))[0, :, :, :, 0]
  v = x[0, :, :, :, 0]
  np.testing.assert_allclose(got[2], 0.5 * (v[1] + v[3]), rtol=1e-6)
  np.testing.assert_allclose(got[0], 0.5 * (v[0] + v[1]), rtol=1e-6)   # first: itself as previous
  np.testing.assert_allclose(got[3], 0.5 * (v[2] + v[3]), rtol=1e-6)   # last: itself as next


def test_gradients_reach_the_kernel_predictor_under_jit():
  x = _volume((1, 3, 8, 8, 1), seed=3)
  model = InterpolationDenoiser(kernel_size=3, features=4)
  params = model.init(jax.random.key(0), x)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))(params)
  assert np.abs(np.asarray(grads["params"]["kernels"]["kernel"])).max() > 0
  out = jax.jit(model.apply)(params, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
