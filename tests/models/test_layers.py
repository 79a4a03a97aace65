"""Conv and up-sampler against scipy/numpy references."""

import os
from unittest import mock

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


@pytest.mark.parametrize("impl", ["native", "depth_as_batch", "im2col"])
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


@pytest.mark.parametrize("pads", [
    ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)),   # a 3x3x3 conv's
    ((0, 0), (0, 0), (2, 2), (1, 1), (0, 0)),   # wider, and an axis left alone
    ((1, 0), (0, 3), (2, 1), (0, 0), (0, 0)),   # uneven, batch axis too
])
@pytest.mark.parametrize("one_pass", [True, False])
def test_edge_pad_equals_numpy_and_its_gradient_sums_the_copies(pads, one_pass):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 3, 4, 5, 2)).astype(np.float32)
  x[0, 0, 0, 0, 0] = np.inf  # exact: a term of zeros added to inf is still inf
  pad = jax.jit(lambda a: layers.edge_pad(a, pads, one_pass=one_pass))
  got = np.asarray(pad(x))
  np.testing.assert_array_equal(got, np.pad(x, pads, mode="edge"))
  if one_pass:  # the sum of pads, not jnp.pad's concatenation, ran
    assert "concatenate" not in str(jax.make_jaxpr(pad)(x))
  # gradient of sum(w * pad(x)): each x element receives the weights of every
  # padded position that copies it (numpy: clamped source indices, np.add.at)
  x[0, 0, 0, 0, 0] = 0.0
  w = rng.standard_normal(got.shape)
  grad = np.asarray(jax.grad(lambda a: jnp.sum(w * pad(a)))(x))
  sources = np.meshgrid(*[np.clip(np.arange(-lo, n + hi), 0, n - 1)
                          for n, (lo, hi) in zip(x.shape, pads)], indexing="ij")
  want = np.zeros(x.shape)
  np.add.at(want, tuple(sources), w)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_edge_pad_and_conv_form_follow_the_platform_traced_for():
  """On this CPU: the concatenation, and depth-as-batch (im2col for a network
  at least 24 wide where YNNPACK runs the 2D convs); under an abstract GPU mesh
  (compiling for a GPU without one): one pass and native 3D convs."""
  x = jnp.zeros((1, 3, 4, 4, 2))
  pads = ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0))
  trace = lambda: str(jax.make_jaxpr(lambda a: layers.edge_pad(a, pads))(x))
  assert "concatenate" in trace()
  # XLA's own 2D convs (the CPU default, conftest): depth-as-batch at every width
  for width in (80, 28, 24, 16, 12, None):  # the demo's widths start at 12
    assert layers.resolve_conv_impl("auto", width) == "depth_as_batch", width
  # where YNNPACK runs the 2D convs (a user put them back): im2col from 24 wide
  ynn = os.environ["XLA_FLAGS"] + " --xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  with mock.patch.dict(os.environ, {"XLA_FLAGS": ynn}):
    assert layers.resolve_conv_impl("auto", 28) == layers.resolve_conv_impl("auto", 24) == "im2col"
    for narrow in (16, 12, None):
      assert layers.resolve_conv_impl("auto", narrow) == "depth_as_batch", narrow
      assert layers.resolve_conv_impl("auto", narrow, forward_only=True) == \
          layers.DEPTH_TAPS_AS_OUTPUTS, narrow
  # a program never differentiated: taps as outputs at every width
  for width in (80, 12, None):
    assert layers.resolve_conv_impl("auto", width, forward_only=True) == \
        layers.DEPTH_TAPS_AS_OUTPUTS
  assert layers.resolve_conv_impl("depth_as_batch", 28, forward_only=True) == "depth_as_batch"
  assert layers.resolve_conv_impl("native", 28) == "native"
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
    assert "concatenate" not in trace()
    assert layers.resolve_conv_impl("auto", 28) == "native"
    assert layers.resolve_conv_impl("auto", 28, forward_only=True) == "native"


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


def _numpy_group_norm(x, scale, bias, groups, eps=1e-5):
  """Per sample and group of channels over every voxel (float64)."""
  x = x.astype(np.float64)
  b, d, h, w, c = x.shape
  g = x.reshape(b, d, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = g.var(axis=(1, 2, 3, 5), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_matches_numpy():
  # an offset and spread per channel, as conv outputs have; trained scale and bias
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 3, 5, 6, 8)) * rng.uniform(0.5, 3, 8)
       + rng.normal(size=8) * 4).astype(np.float32)
  norm = layers.Norm("group", groups=2)
  params = norm.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, params) == {
      "params": {"group_norm": {"scale": (8,), "bias": (8,)}}}
  leaf = {"scale": rng.uniform(0.5, 2, 8).astype(np.float32),
          "bias": rng.normal(size=8).astype(np.float32)}
  params = {"params": {"group_norm": leaf}}
  out = np.asarray(jax.jit(norm.apply)(params, x))
  want = _numpy_group_norm(x, leaf["scale"], leaf["bias"], groups=2)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # bfloat16 compute (the GPU default) gives the same numbers to its precision
  out_bf16 = layers.Norm("group", groups=2, dtype=jnp.bfloat16).apply(params, x)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32), want, rtol=2e-2, atol=5e-2)


def test_group_norm_keeps_its_digits_where_the_mean_dwarfs_the_spread():
  """After an ELU activations sit at a mean several times their spread; a
  one-pass float32 variance (E[x^2] - E[x]^2, flax's nn.GroupNorm) was
  2.4e-4 off there on a 2x16x128x128x12 activation. Half a million voxels a
  group, mean 30 spread 1 (E[x^2] ~ 900: float32 keeps ~5e-5 of it)."""
  rng = np.random.default_rng(1)
  x = (30 + rng.normal(size=(2, 4, 64, 64, 8))).astype(np.float32)
  norm = layers.Norm("group", groups=4)
  params = norm.init(jax.random.key(0), x)
  out = np.asarray(jax.jit(norm.apply)(params, x))
  want = _numpy_group_norm(x, np.ones(8), np.zeros(8), groups=4)
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


def test_group_norm_takes_flax_group_norm_parameters_and_gradients_match_float64():
  """States saved while the model used flax's nn.GroupNorm load unchanged
  (same names and shapes, same function); the gradient against float64
  autodiff of the textbook formula."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(2, 3, 4, 5, 6)) * 2 + 1).astype(np.float32)
  ours = layers.GroupNorm(3)
  theirs = nn.GroupNorm(num_groups=3, epsilon=1e-5)
  params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      np.shape, params)
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)),
                             np.asarray(theirs.apply(params, x)), rtol=1e-5, atol=1e-5)
  probe = rng.normal(size=x.shape)

  def textbook(a, scale, bias):  # float64
    g = a.reshape(*a.shape[:-1], 3, 2)
    mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 3, 5), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(a.shape) * scale + bias

  leaf = params["params"]
  got = jax.grad(lambda a, p: jnp.sum(probe * ours.apply({"params": p}, a)),
                 argnums=(0, 1))(x, leaf)
  with jax.enable_x64():
    want = jax.grad(lambda a, sc, bi: jnp.sum(probe * textbook(a, sc, bi)), argnums=(0, 1, 2))(
        x.astype(np.float64), np.float64(leaf["scale"]), np.float64(leaf["bias"]))
  for g, w in ((got[0], want[0]), (got[1]["scale"], want[1]), (got[1]["bias"], want[2])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
  with jax.enable_x64():  # a float64 model (the PyTorch check's gradients) keeps float64
    x64 = x.astype(np.float64)
    got64 = np.asarray(layers.GroupNorm(3, dtype=jnp.float64).apply(params, x64))
    assert got64.dtype == np.float64
    want64 = textbook(x64, np.float64(leaf["scale"]), np.float64(leaf["bias"]))
    np.testing.assert_allclose(got64, np.asarray(want64), rtol=1e-12, atol=1e-12)


def test_elu_on_a_cpu_is_elu_to_float32_rounding_and_has_its_gradient():
  """layers.elu writes expm1(x) as exp(x) - 1 on a CPU (XLA:CPU fuses expm1
  into a scalar loop); against float64, within the rounding of exp(x) ~ 1,
  and the gradient exp(x) for x <= 0 (1 at 0, as jax.nn.elu), 1 above."""
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.normal(size=4000) * 5, rng.normal(size=1000) * 1e-6,
                      [0.0, -0.0, -1e-30, 1e-30, -80.0, 80.0]]).astype(np.float32)
  got = np.asarray(jax.jit(layers.elu)(x))
  want = np.where(x > 0, x.astype(np.float64), np.expm1(x.astype(np.float64)))
  np.testing.assert_allclose(got, want, rtol=2e-7, atol=1.2e-7)
  assert got[-4] == 0.0 and got[-2] == -1.0  # no rounding at 0 or far out
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(layers.elu)))(x))
  np.testing.assert_allclose(grad, np.where(x > 0, 1.0, np.exp(x.astype(np.float64))),
                             rtol=2e-7, atol=0)
  np.testing.assert_array_equal(grad[-6:-2], np.asarray(jax.vmap(jax.grad(jax.nn.elu))(x[-6:-2])))


def test_norm_none_is_the_identity_without_parameters():
  x = jnp.arange(24.0).reshape(1, 1, 2, 3, 4)
  norm = layers.Norm("none")
  params = norm.init(jax.random.key(0), x)
  assert not jax.tree.leaves(params)
  np.testing.assert_array_equal(np.asarray(norm.apply(params, x)), np.asarray(x))
  with pytest.raises(ValueError, match="'layer'"):
    layers.Norm("layer").init(jax.random.key(0), x)


@pytest.mark.parametrize("kernel_shape,strides", [((3, 3, 3), (1, 1, 1)),
                                                  ((3, 3, 3), (2, 2, 2)),
                                                  ((1, 3, 3), (1, 2, 2))])
def test_im2col_gradients_equal_xla_convolutions(kernel_shape, strides):
  """The matmul form's autodiff (slices, pads, a matmul's transposes)
  against XLA's own conv gradients, for input and kernel."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 7, 10, 11, 3))
  kernel = rng.standard_normal((*kernel_shape, 3, 4))
  out_shape = jax.eval_shape(lambda: layers.conv3d(x, kernel, strides, "native")).shape
  weights = rng.standard_normal(out_shape[1:-1])
  def loss(impl):
    return lambda a, k: jnp.sum(weights[..., None] * layers.conv3d(a, k, strides, impl) ** 2)
  with jax.enable_x64():
    want = jax.grad(loss("native"), argnums=(0, 1))(x, kernel)
    got = jax.grad(loss("im2col"), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel_shape,cout,narrow,impl", [
    ((3, 3, 3), layers.DEPTH_TAPS_AS_OUTPUTS_MAX_WIDTH, True, "depth_as_batch"),  # depth taps
    ((3, 3, 3), layers.DEPTH_TAPS_AS_OUTPUTS_MAX_WIDTH + 1, False, "depth_as_batch"),
    ((3, 3, 3), layers.DEPTH_TAPS_AS_OUTPUTS_MAX_WIDTH + 1, True, layers.DEPTH_TAPS_AS_OUTPUTS),
    ((2, 1, 3), 4, True, "depth_as_batch"),                         # even depth, one row
    ((1, 5, 5), layers.ROWS_AS_OUTPUTS_MAX_WIDTH, True, layers.DEPTH_TAPS_AS_OUTPUTS),  # rows
    ((1, 5, 5), layers.ROWS_AS_OUTPUTS_MAX_WIDTH, False, "depth_as_batch"),  # not in training
    ((1, 5, 5), layers.ROWS_AS_OUTPUTS_MAX_WIDTH + 1, False, layers.DEPTH_TAPS_AS_OUTPUTS),
    ((1, 4, 2), 2, True, layers.DEPTH_TAPS_AS_OUTPUTS),                       # even rows
    ((1, 1, 1), 2, False, "depth_as_batch"),                                      # no taps
])
def test_depth_as_batch_narrow_outputs_match_scipy_with_their_gradients(kernel_shape, cout,
                                                                         narrow, impl):
  """depth_as_batch's taps-as-outputs form (taps moved into the outputs;
  input gradient `conv3d_input_gradient`, kernel gradient the batched
  form's) against scipy, and both gradients against numpy's sums: dL/dx is
  the full correlation of the cotangent with the flipped kernel, dL/dw the
  cotangent's products with shifted inputs."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 6, 9, 10, 3))
  kernel = rng.standard_normal((*kernel_shape, 3, cout))
  conv = lambda a, k: layers.conv3d(a, k, (1, 1, 1), impl)
  assert ("custom_vjp" in str(jax.make_jaxpr(conv)(x, kernel))) == narrow
  with jax.enable_x64():
    got = np.asarray(jax.jit(conv)(x, kernel))
    np.testing.assert_allclose(got, _scipy_conv(x, kernel), rtol=1e-10, atol=1e-10)
    cotangent = rng.standard_normal(got.shape)
    grad_x, grad_k = jax.grad(lambda a, k: jnp.sum(cotangent * conv(a, k)),
                              argnums=(0, 1))(x, kernel)
  kd, kh, kw = kernel_shape
  flipped = kernel[::-1, ::-1, ::-1].transpose(0, 1, 2, 4, 3)
  padded = np.pad(cotangent, [(0, 0), (kd - 1,) * 2, (kh - 1,) * 2, (kw - 1,) * 2, (0, 0)])
  np.testing.assert_allclose(np.asarray(grad_x), _scipy_conv(padded, flipped),
                             rtol=1e-10, atol=1e-10)
  d, h, w = got.shape[1:4]
  want_k = np.zeros(kernel.shape)
  for a in range(kd):
    for b in range(kh):
      for c in range(kw):
        want_k[a, b, c] = np.einsum("nzyxi,nzyxo->io", x[:, a:a + d, b:b + h, c:c + w],
                                    cotangent)
  np.testing.assert_allclose(np.asarray(grad_k), want_k, rtol=1e-10, atol=1e-10)


def test_im2col_values_do_not_depend_on_the_place_in_the_batch():
  """Sliding-window inference puts a window in whichever batch slot is free;
  a region predicted with context equals the whole volume's only if a
  window's output is the same bits in every slot. The matmul form gives
  that on XLA:CPU with the batch sharded over two devices (depth_as_batch's
  2D convs did not, by an ulp)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 4, 16, 16, 8)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, 8, 8)).astype(np.float32)
  conv = jax.jit(lambda a, k: layers.conv3d(a, k, (1, 1, 1), "im2col"),
                 in_shardings=(batch, whole), out_shardings=batch)
  swapped = [1, 0, 3, 2]  # each device's two windows trade places
  np.testing.assert_array_equal(np.asarray(conv(x[swapped], kernel)),
                                np.asarray(conv(x, kernel))[swapped])
