"""The FG-BG discriminator: region logits, shapes, locality."""

import jax
import jax.numpy as jnp
import numpy as np

from stt_jax.models.discriminator import Discriminator, StridedConv


def test_region_logits_shape_for_deep_and_shallow_patches():
  model = Discriminator(features=(4, 8))
  for shape, expected in (((2, 8, 32, 48, 1), (2, 2, 8, 12, 1)),
                          ((1, 3, 16, 16, 1), (1, 3, 4, 4, 1))):
    image = jnp.ones(shape)
    params = model.init(jax.random.key(0), image, image)
    out = jax.jit(model.apply)(params, image, image)
    assert out.shape == expected and out.dtype == jnp.float32


def test_logits_are_per_region():
  # a change in one corner of the mask moves only the logits whose receptive
  # field covers it (two 3x3 stride-2 convs: at most 7 voxels in-plane)
  model = Discriminator(features=(4, 8))
  image = jax.random.uniform(jax.random.key(0), (1, 8, 64, 64, 1))
  mask = jnp.zeros_like(image)
  params = model.init(jax.random.key(1), image, mask)
  base = np.asarray(model.apply(params, image, mask))
  moved = np.asarray(model.apply(params, image, mask.at[:, :, :4, :4].set(1.0)))
  changed = np.abs(moved - base).max(axis=(0, 1, 4)) > 0
  assert changed[0, 0] and not changed[4:, :].any() and not changed[:, 4:].any()


def test_both_conv_implementations_give_the_same_logits():
  image = jax.random.uniform(jax.random.key(0), (2, 8, 32, 32, 1))
  mask = jax.random.uniform(jax.random.key(1), (2, 8, 32, 32, 1))
  native = Discriminator(features=(4, 8), impl="native")
  params = native.init(jax.random.key(2), image, mask)
  for impl in ("depth_as_batch", "im2col"):
    other = Discriminator(features=(4, 8), impl=impl)
    np.testing.assert_allclose(np.asarray(other.apply(params, image, mask)),
                               np.asarray(native.apply(params, image, mask)),
                               rtol=1e-5, atol=1e-6, err_msg=impl)
  # zero padding 1 on each side: ceil(n / 2) outputs, like SAME's size
  x = jnp.concatenate([image, mask], -1)
  conv0 = params["params"]["conv0"]
  ref = jax.lax.conv_general_dilated(x, conv0["kernel"], (2, 2, 2), [(1, 1)] * 3,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  for impl in ("native", "depth_as_batch", "im2col"):
    got = StridedConv(4, (2, 2, 2), impl=impl).apply({"params": conv0}, x)
    assert got.shape == (2, 4, 16, 16, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref + conv0["bias"]),
                               rtol=1e-5, atol=1e-6)
