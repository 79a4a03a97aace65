import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.models.unet import ResUNet, input_multiple


@pytest.mark.parametrize("downsample_z,shape", [((False,) * 4, (1, 3, 32, 48, 1)),
                                               ((True, False, False, False), (2, 4, 16, 16, 1))])
def test_shapes_and_jit(downsample_z, shape):
  model = ResUNet(widths=(4, 6, 8, 8, 10), downsample_z=downsample_z)
  x = jax.random.uniform(jax.random.key(0), shape)
  params = jax.jit(model.init)(jax.random.key(1), x)
  eager = model.apply(params, x)
  jitted = jax.jit(model.apply)(params, x)
  assert eager.shape == shape[:-1] + (2,) and eager.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(jitted)))


def test_conv_implementations_agree():
  x = jax.random.uniform(jax.random.key(0), (1, 4, 32, 32, 1))
  native = ResUNet(widths=(4, 4, 6, 6, 8), conv_impl="native")
  folded = ResUNet(widths=(4, 4, 6, 6, 8), conv_impl="depth_as_batch")
  params = jax.jit(native.init)(jax.random.key(1), x)
  np.testing.assert_allclose(np.asarray(native.apply(params, x)),
                             np.asarray(folded.apply(params, x)), rtol=1e-4, atol=1e-5)


def test_z_is_local_without_z_downsampling():
  # no z down-sampling: a change in slice 0 cannot reach far slices beyond the
  # receptive field in z (each 3x3x3 conv adds 1)
  model = ResUNet(widths=(4, 4, 4, 4, 4))
  x = jax.random.uniform(jax.random.key(0), (1, 40, 16, 16, 1))
  params = jax.jit(model.init)(jax.random.key(1), x)
  y0 = model.apply(params, x)
  y1 = model.apply(params, x.at[:, 0].set(0.0))
  changed = np.abs(np.asarray(y1 - y0)).max(axis=(0, 2, 3, 4)) > 0
  assert changed[0] and not changed[-1]


def test_input_multiple():
  assert input_multiple((False,) * 4) == (1, 16, 16)
  assert input_multiple((True, True, False, False)) == (4, 16, 16)
