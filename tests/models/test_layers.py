"""Conv and up-sampler against scipy/numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from stt_jax.models import layers


def _scipy_conv(x, kernel):
  """VALID cross-correlation of x [b, d, h, w, cin] with kernel [kd, kh, kw, cin, cout]."""
  kd, kh, kw, cin, cout = kernel.shape
  b, d, h, w, _ = x.shape
  out = np.zeros((b, d - kd + 1, h - kh + 1, w - kw + 1, cout))
  for n in range(b):
    for o in range(cout):
      acc = 0
      for i in range(cin):
        full = ndimage.correlate(x[n, ..., i].astype(np.float64),
                                 kernel[..., i, o].astype(np.float64), mode="constant",
                                 origin=[-(k // 2) for k in (kd, kh, kw)])
        acc = acc + full[:d - kd + 1, :h - kh + 1, :w - kw + 1]
      out[n, ..., o] = acc
  return out


@pytest.mark.parametrize("impl", ["native", "depth_as_batch"])
@pytest.mark.parametrize("kernel_shape,strides", [((3, 3, 3), (1, 1, 1)),
                                                  ((1, 3, 3), (1, 2, 2)),
                                                  ((3, 3, 3), (2, 2, 2)),
                                                  ((1, 5, 5), (1, 1, 1))])
def test_conv3d_matches_scipy(impl, kernel_shape, strides):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 10, 11, 3)).astype(np.float32)
  kernel = rng.standard_normal((*kernel_shape, 3, 4)).astype(np.float32)
  got = np.asarray(jax.jit(layers.conv3d, static_argnums=(2, 3))(
      x, kernel, strides, impl))
  ref = _scipy_conv(x, kernel)[:, ::strides[0], ::strides[1], ::strides[2]]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_conv_module_pads_by_edge_replication():
  x = np.random.default_rng(1).standard_normal((1, 3, 6, 6, 2)).astype(np.float32)
  module = layers.Conv(features=2, kernel_size=(3, 3, 3))
  params = module.init(jax.random.key(0), x)
  got = np.asarray(module.apply(params, x))
  kernel = np.asarray(params["params"]["kernel"])
  ref = _scipy_conv(np.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)], mode="edge"), kernel)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_bilinear_upsample_matches_transposed_conv_loop():
  x = np.random.default_rng(2).standard_normal((2, 3, 5, 4, 2)).astype(np.float32)
  weights = [0.25, 0.75, 0.75, 0.25]
  axis = 2
  n = x.shape[axis]
  ref = np.zeros(x.shape[:axis] + (2 * n + 2,) + x.shape[axis + 1:])
  for i in range(n):  # transposed conv: input i scatters to 2i - 1 + k
    for k, wk in enumerate(weights):
      o = 2 * i + k  # index into the output padded by 1 on the left
      ref[:, :, o] += wk * x[:, :, i]
  ref = ref[:, :, 1:2 * n + 1]
  got = np.asarray(layers.bilinear_upsample_2x(jnp.asarray(x), axis))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert got[0, 0, 0, 0, 0] == pytest.approx(0.75 * x[0, 0, 0, 0, 0])
