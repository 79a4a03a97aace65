"""Deformable conv against lax convs, shifted convs and a scipy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import ndimage

from stt_jax.models.deformable_conv import GRADIENTS, DeformableConv, deformable_conv2d

DN = ("NHWC", "HWIO", "NHWC")


def _inputs(seed, n=2, h=7, w=9, c=4, c_out=3, groups=2, k=3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  kernel = rng.standard_normal((k, k, c, c_out)).astype(np.float32)
  offsets = np.zeros((n, h, w, groups, k * k, 2), np.float32)
  return rng, x, kernel, offsets


def _rel_err(a, b):
  b = np.asarray(b, np.float64)
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_zero_offsets_equal_a_plain_convolution():
  _, x, kernel, offsets = _inputs(0)
  ref = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN,
                                 precision=lax.Precision.HIGHEST)
  assert _rel_err(deformable_conv2d(x, offsets, kernel), np.asarray(ref)) <= 1e-5


@pytest.mark.parametrize("dy,dx", [(1, 0), (-2, 1), (0, 3)])
def test_integer_offsets_equal_a_shifted_convolution(dy, dx):
  _, x, kernel, offsets = _inputs(1)
  offsets[..., 0], offsets[..., 1] = dy, dx
  # sampling at p + k + (dy, dx) == a VALID convolution of the zero-padded
  # input read from a window moved by (dy, dx)
  r = 1 + max(abs(dy), abs(dx))
  h, w = x.shape[1:3]
  padded = np.pad(x, [(0, 0), (r, r), (r, r), (0, 0)])
  window = padded[:, r + dy - 1: r + dy - 1 + h + 2, r + dx - 1: r + dx - 1 + w + 2]
  ref = lax.conv_general_dilated(window, kernel, (1, 1), "VALID", dimension_numbers=DN,
                                 precision=lax.Precision.HIGHEST)
  assert _rel_err(deformable_conv2d(x, offsets, kernel), np.asarray(ref)) <= 1e-5


def _scipy_reference(x, offsets, kernel, mask=None):
  n, h, w, c = x.shape
  kh, kw, _, c_out = kernel.shape
  groups = offsets.shape[3]
  cg = c // groups
  out = np.zeros((n, h, w, c_out))
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  for b in range(n):
    for ch in range(c):
      g = ch // cg
      for k in range(kh * kw):
        ky, kx = k // kw - kh // 2, k % kw - kw // 2
        coords = [yy + ky + offsets[b, :, :, g, k, 0], xx + kx + offsets[b, :, :, g, k, 1]]
        # bilinear with zeros outside the image
        vals = ndimage.map_coordinates(x[b, :, :, ch].astype(np.float64), coords,
                                       order=1, mode="grid-constant", cval=0.0)
        if mask is not None:
          vals = vals * mask[b, :, :, g, k]
        out[b] += vals[..., None] * kernel[k // kw, k % kw, ch][None, None, :]
  return out


@pytest.mark.parametrize("use_mask", [False, True])
def test_fractional_offsets_match_scipy_map_coordinates(use_mask):
  rng, x, kernel, offsets = _inputs(2)
  offsets[:] = rng.uniform(-2.5, 2.5, offsets.shape)  # many samples leave the image
  mask = rng.uniform(0, 1, offsets.shape[:-1]).astype(np.float32) if use_mask else None
  got = deformable_conv2d(x, offsets, kernel, mask)
  assert _rel_err(got, _scipy_reference(x, offsets, kernel, mask)) <= 1e-5


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradients_match_finite_differences(gradient):
  rng, x, kernel, offsets = _inputs(3, n=2, h=5, w=6, c=4, c_out=2, groups=2)
  offsets[:] = rng.uniform(-1.4, 1.4, offsets.shape)
  offsets = np.round(offsets * 4) / 4 + 0.125  # keep away from integer kinks
  with jax.enable_x64(True):
    x64, k64, o64 = (jnp.asarray(a, jnp.float64) for a in (x, kernel, offsets))
    probe = jnp.asarray(rng.standard_normal((2, 5, 6, 2)), jnp.float64)
    loss = lambda xx, kk, oo: jnp.sum(
        deformable_conv2d(xx, oo, kk, gradient=gradient) * probe)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x64, k64, o64)
    eps = 1e-6
    for arg, grad in zip(range(3), grads):
      args = [x64, k64, o64]
      flat = np.asarray(args[arg]).ravel()
      for idx in rng.choice(flat.size, 8, replace=False):
        plus, minus = flat.copy(), flat.copy()
        plus[idx] += eps
        minus[idx] -= eps
        a_plus, a_minus = list(args), list(args)
        a_plus[arg] = jnp.asarray(plus.reshape(args[arg].shape))
        a_minus[arg] = jnp.asarray(minus.reshape(args[arg].shape))
        numeric = (loss(*a_plus) - loss(*a_minus)) / (2 * eps)
        assert float(np.asarray(grad).ravel()[idx]) == pytest.approx(float(numeric),
                                                                     rel=1e-5, abs=1e-7)


def test_jit_vmap_and_bfloat16():
  rng, x, kernel, offsets = _inputs(4)
  offsets[:] = rng.uniform(-1, 1, offsets.shape)
  ref = np.asarray(deformable_conv2d(x, offsets, kernel))
  jitted = jax.jit(deformable_conv2d)(x, offsets, kernel)
  np.testing.assert_allclose(np.asarray(jitted), ref, rtol=1e-5, atol=1e-5)
  # vmap over an extra leading axis (e.g. slices of a volume)
  stacked = jax.vmap(deformable_conv2d, in_axes=(0, 0, None))(
      np.stack([x, 2 * x]), np.stack([offsets, offsets]), kernel)
  np.testing.assert_allclose(np.asarray(stacked[1]), 2 * ref, rtol=1e-5, atol=1e-4)
  bf16 = deformable_conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(offsets, jnp.bfloat16),
                           jnp.asarray(kernel, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  assert _rel_err(np.asarray(bf16, np.float32), ref) < 3e-2


def test_bfloat16_input_samples_at_float32_positions():
  """bfloat16 values, but the sampling positions (pixel + tap + offset) must
  not be rounded to bfloat16: from 128 to 256 its spacing is a whole pixel."""
  rng, x, kernel, offsets = _inputs(7, n=1, h=3, w=200, c=2, c_out=1, groups=1)
  x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # values bf16 holds exactly
  offsets[..., 1] = 0.375  # exact in bfloat16; x positions 0.375 ... 200.375
  ref = _scipy_reference(x, offsets, kernel)
  got = deformable_conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(offsets, jnp.bfloat16),
                          jnp.asarray(kernel, jnp.bfloat16))
  err = np.abs(np.asarray(got, np.float64) - ref)[..., 130:198, :]  # positions in [128, 256)
  assert err.max() <= 0.02 * np.abs(ref).max(), err.max()


def test_bfloat16_input_gradient_sums_in_float32():
  """Each pixel's gradient gathers ~36 bilinear contributions through the
  gather's scatter-add: summed in bfloat16 they lose about twice the accuracy
  that one final rounding costs. Reference: the float64 gradient of the same
  bfloat16-representable inputs."""
  rng = np.random.default_rng(0)
  bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  x = bf16(rng.standard_normal((2, 24, 24, 8)))
  kernel = bf16(rng.standard_normal((3, 3, 8, 8)) / np.sqrt(72))
  offsets = bf16(rng.uniform(-1.5, 1.5, (2, 24, 24, 2, 9, 2)))
  probe = bf16(rng.standard_normal((2, 24, 24, 8)))
  with jax.enable_x64(True):
    want = np.asarray(jax.grad(lambda xx: jnp.sum(deformable_conv2d(
        xx, jnp.asarray(offsets, jnp.float64), jnp.asarray(kernel, jnp.float64)) * probe))(
            jnp.asarray(x, jnp.float64)))

  def error(**accumulate):
    got = jax.grad(lambda xx: jnp.sum(deformable_conv2d(
        xx, jnp.asarray(offsets, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16),
        **accumulate).astype(jnp.float32) * probe))(
            jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    return _rel_err(got, want)

  assert error() <= 0.0035                        # the default; measured 0.0023
  assert error(accumulate_dtype=None) > 0.0045    # summed in bfloat16: measured 0.0053


def test_module_starts_as_a_plain_convolution():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  guide = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  module = DeformableConv(features=5, offset_groups=2, modulation=True)
  params = module.init(jax.random.key(0), x, guide)
  out = module.apply(params, x, guide)
  kernel = params["params"]["kernel"]
  ref = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN,
                                 precision=lax.Precision.HIGHEST)
  assert _rel_err(out, np.asarray(ref)) <= 1e-5
  # the guide moves the sampling once the offset predictor is trained
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x, guide) ** 2))(params)
  assert np.abs(np.asarray(grads["params"]["offset_conv"]["kernel"])).max() > 0


def test_the_gradient_orders_agree_where_many_samples_share_a_pixel():
  """The three orders of the scatter-add sum the same terms: in float32 they
  differ by rounding only, on offsets that pile many samples onto a few
  pixels (ties for the sort, repeated rows within a tap for tap_major)."""
  rng, x, kernel, offsets = _inputs(7, n=2, h=9, w=11, c=6, c_out=3, groups=3)
  offsets[:] = np.round(rng.uniform(-3, 3, offsets.shape)) + 0.5 * (
      rng.uniform(size=offsets.shape) < 0.5)
  probe = jnp.asarray(rng.standard_normal((2, 9, 11, 3)), jnp.float32)
  grads = {g: jax.jit(jax.grad(lambda xx, oo, g=g: jnp.sum(
      deformable_conv2d(xx, oo, kernel, gradient=g) * probe), argnums=(0, 1)))(x, offsets)
           for g in GRADIENTS}
  for g in GRADIENTS[1:]:
    for got, want in zip(grads[g], grads["scatter"]):
      assert _rel_err(got, want) <= 1e-6, g
  with pytest.raises(ValueError, match="gradient must be one of"):
    deformable_conv2d(x, offsets, kernel, gradient="sort")


def test_the_gradient_order_reaches_the_module_from_the_config():
  """model.attention.deform_gradient -> UNet -> SST block -> DeformableConv:
  the STT-UNET samples through the custom gradient of the order asked for,
  and only then (the values are deformable_conv2d's, checked above)."""
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  cfg = config_lib.default_config()
  cfg.model.widths = (4, 8)
  cfg.model.downsample_z = (False,)
  cfg.model.attention.design = "split"
  cfg.model.attention.encoder_levels = (1,)
  cfg.model.attention.decoder_levels = ()
  cfg.model.attention.deform_groups = 2
  image = jnp.zeros((1, 2, 8, 8, 1), jnp.float32)
  for order in GRADIENTS:
    cfg.model.attention.deform_gradient = order
    model = unet.from_config(cfg.model)
    params = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
    loss = lambda p, m=model: jnp.sum(m.apply({"params": p}, image))
    forward = str(jax.make_jaxpr(loss)(params))
    for other in GRADIENTS[1:]:
      assert (f"name=_sample_{other}_gradient" in forward) == (order == other)
    assert (" sort[" in str(jax.make_jaxpr(jax.grad(loss))(params))) == (order == "sorted")
