"""Building blocks of the Res-UNet: edge-padded convs, residual anisotropic
blocks, the optional normalisation after each conv, and the fixed bilinear
up-sampler of the original Res-UNET-R.

All activations are `[batch, depth, height, width, channels]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from stt_jax import backend
from stt_jax.models import traced_platform

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


CONV_IMPLS = ("auto", "native", "depth_as_batch", "im2col")
# narrowest width of a network from which 'auto' runs its convs as im2col on
# a CPU whose 2D convs YNNPACK runs (jaxlib's default, which stt_jax turns
# off): measured faster at widths 24-80 and 28-80, slower at 12-48 and 16-64
IM2COL_MIN_WIDTH = 24


# depth_as_batch with every stride-1 3D conv's depth taps as outputs, not only
# narrow ones: 'auto' on a CPU for programs never differentiated (inference)
DEPTH_TAPS_AS_OUTPUTS = "depth_taps_as_outputs"


def resolve_conv_impl(impl: str, narrowest_width: int | None = None, *,
                      forward_only: bool = False) -> str:
  """'auto' -> 'native' on GPUs/TPUs (cuDNN has fast 3D convs); on a CPU
  'depth_as_batch' (2D convs, which XLA's own Eigen convolutions run fastest
  at every width measured), or, where YNNPACK runs the 2D convs
  (`backend.ynn_convolutions_on`: a user's XLA_FLAGS put them back),
  'im2col' for a network whose narrowest width is >= IM2COL_MIN_WIDTH. One
  form for the whole network (docs/architecture.md "Three implementations
  of the same 3D conv"). `forward_only` (a program that is never
  differentiated): depth_as_batch becomes DEPTH_TAPS_AS_OUTPUTS, whose
  forward is faster at every width but whose training step was not
  ("Narrow outputs")."""
  if impl == "auto":
    if traced_platform.name() != "cpu":
      return "native"
    wide = narrowest_width is not None and narrowest_width >= IM2COL_MIN_WIDTH
    if wide and backend.ynn_convolutions_on():
      return "im2col"
    return DEPTH_TAPS_AS_OUTPUTS if forward_only else "depth_as_batch"
  if impl not in (*CONV_IMPLS, DEPTH_TAPS_AS_OUTPUTS):
    raise ValueError(f"unknown conv implementation {impl!r}")
  return impl


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
           impl: str) -> jax.Array:
  """VALID 3D convolution. x [b, d, h, w, cin], kernel [kd, kh, kw, cin, cout].

  'depth_as_batch' writes it as a sum over the kd depth taps of 2D convolutions
  with depth folded into the batch (for few output channels as one 2D conv
  whose outputs hold the taps, `conv3d_taps_as_outputs`, its input gradient
  likewise); 'im2col' as one matmul (`_conv3d_im2col`): the same function,
  other XLA programs.
  """
  impl = resolve_conv_impl(impl)
  if impl == "native":
    return lax.conv_general_dilated(x, kernel, tuple(strides), "VALID",
                                    dimension_numbers=_DN3)
  if impl == "im2col":
    return _conv3d_im2col(x, kernel, strides)
  if tuple(strides) == (1, 1, 1) and _taps_as_outputs(kernel.shape, impl):
    return _conv3d_taps_as_outputs_with_fast_gradient(x, kernel)
  return conv3d_depth_as_batch(x, kernel, strides)


def conv3d_depth_as_batch(x: jax.Array, kernel: jax.Array,
                           strides: Sequence[int]) -> jax.Array:
  """`conv3d` as the sum over the kd depth taps of 2D convs, depth in the batch."""
  b, d, h, w, c = x.shape
  kd = kernel.shape[0]
  sd, sh, sw = strides
  d_out = (d - kd) // sd + 1
  out = None
  for tap in range(kd):
    planes = x[:, tap: tap + (d_out - 1) * sd + 1: sd]
    planes = planes.reshape(b * d_out, h, w, c)
    y = lax.conv_general_dilated(planes, kernel[tap], (sh, sw), "VALID",
                                 dimension_numbers=_DN2)
    out = y if out is None else out + y
  return out.reshape(b, d_out, *out.shape[1:])


# XLA:CPU's (Eigen's) 2D convolutions use their cores poorly when a conv has
# few output channels: a 3x3x3 conv 12 -> 12 on 2x18x130x130 ran at 29
# GFLOP/s as batched 2D convs, a 28 -> 28 one at 101 (2-core EPYC, jax
# 0.10.2, bench/conv_forms.py). So the taps go into the output channels
# (`conv3d_taps_as_outputs`), forward and, for the input gradient, backward
# (`conv3d_input_gradient`: the batched form's input gradient is kd 2D convs
# with cin outputs each, plus a zero-padded copy of each to sum). In training
# ('depth_as_batch') for 3D kernels up to this width; in inference
# (DEPTH_TAPS_AS_OUTPUTS) for every 3D kernel, and for the rows of a 2D
# kernel below 8 outputs (the head; in training its form cost ~30 ms a step
# at the demo's 16x128x128: docs/architecture.md "Narrow outputs").
DEPTH_TAPS_AS_OUTPUTS_MAX_WIDTH = 16
ROWS_AS_OUTPUTS_MAX_WIDTH = 7


def _taps_as_outputs(kernel_shape: Sequence[int], impl: str) -> bool:
  kd, kh, _, _, cout = kernel_shape
  if impl == DEPTH_TAPS_AS_OUTPUTS:
    return kd > 1 or (kh > 1 and cout <= ROWS_AS_OUTPUTS_MAX_WIDTH)
  return kd > 1 and cout <= DEPTH_TAPS_AS_OUTPUTS_MAX_WIDTH


def _shifted_tap_sum(y: jax.Array, axis: int, size: int, full: bool) -> jax.Array:
  """y [..., taps, c] -> sum over taps t of y[..., t, :] moved t along `axis`:
  the slices [t, t + size) (a VALID conv's taps) or, `full`, y zero-padded
  by (t, taps - 1 - t) (a full correlation's)."""
  taps = y.shape[-2]
  out = None
  for tap in range(taps):
    term = lax.index_in_dim(y, tap, axis=y.ndim - 2, keepdims=False)
    if full:
      config = [(0, 0, 0)] * term.ndim
      config[axis] = (tap, taps - 1 - tap, 0)
      term = lax.pad(term, jnp.zeros((), term.dtype), config)
    else:
      term = lax.slice_in_dim(term, tap, tap + size, axis=axis)
    out = term if out is None else out + term
  return out


def conv3d_taps_as_outputs(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3d` at stride 1 as one 2D conv of every plane whose output channels
  hold the kernel's depth taps (kd > 1) or rows (kd = 1) side by side,
  [..., taps * cout], then the sum of the taps' shifted slices: the same
  FLOPs as depth_as_batch in one conv taps times as wide."""
  b, d, h, w, c = x.shape
  kd, kh, kw, _, cout = kernel.shape
  if kd > 1:
    taps, axis, size = kd, 1, d - kd + 1
    weights = kernel.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c, kd * cout)
  else:
    taps, axis, size = kh, 2, h - kh + 1
    weights = kernel[0].transpose(1, 2, 0, 3).reshape(1, kw, c, kh * cout)
  y = lax.conv_general_dilated(x.reshape(b * d, h, w, c), weights, (1, 1), "VALID",
                               dimension_numbers=_DN2)
  return _shifted_tap_sum(y.reshape(b, d, *y.shape[1:3], taps, cout), axis, size, False)


def conv3d_input_gradient(cotangent: jax.Array, kernel: jax.Array) -> jax.Array:
  """d(sum(cotangent * conv3d(x, kernel)))/dx of a VALID stride-1 `conv3d`:
  the full correlation of the cotangent [b, d', h', w', cout] with the
  flipped kernel, [b, d' + kd - 1, h' + kh - 1, w' + kw - 1, cin], in the
  taps-as-outputs form: one 2D conv (in-plane full padding, done by the
  conv) whose cin * taps outputs are summed depth- (or row-) shifted."""
  b, d, h, w, cout = cotangent.shape
  kd, kh, kw, cin, _ = kernel.shape
  if kd > 1:
    taps, axis = kd, 1
    weights = kernel[:, ::-1, ::-1].transpose(1, 2, 4, 0, 3).reshape(kh, kw, cout, kd * cin)
    padding = ((kh - 1, kh - 1), (kw - 1, kw - 1))
  else:
    taps, axis = kh, 2
    weights = kernel[0, :, ::-1].transpose(1, 3, 0, 2).reshape(1, kw, cout, kh * cin)
    padding = ((0, 0), (kw - 1, kw - 1))
  y = lax.conv_general_dilated(cotangent.reshape(b * d, h, w, cout), weights, (1, 1), padding,
                               dimension_numbers=_DN2)
  return _shifted_tap_sum(y.reshape(b, d, *y.shape[1:3], taps, cin), axis, 0, True)


@jax.custom_vjp
def _conv3d_taps_as_outputs_with_fast_gradient(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Forward `conv3d_taps_as_outputs`; input gradient `conv3d_input_gradient`,
  kernel gradient the batched 2D convs' (2x18x130x130, 12 -> 12: forward +
  gradient ~205 ms against ~260 with the batched input gradient, ~323 with
  the taps form's own autodiff)."""
  return conv3d_taps_as_outputs(x, kernel)


def _taps_forward(x, kernel):
  return conv3d_taps_as_outputs(x, kernel), (x, kernel)


def _taps_gradient(residuals, cotangent):
  x, kernel = residuals
  _, kernel_pullback = jax.vjp(lambda k: conv3d_depth_as_batch(x, k, (1, 1, 1)), kernel)
  return conv3d_input_gradient(cotangent, kernel), kernel_pullback(cotangent)[0]


_conv3d_taps_as_outputs_with_fast_gradient.defvjp(_taps_forward, _taps_gradient)


def _conv3d_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
  """`conv3d` as one matmul: the kh*kw in-plane taps of every input plane
  side by side in channels ([b, d, h', w', kh*kw*cin]), times the kernel laid
  out [kh*kw*cin, kd*cout], gives each depth tap's term for every plane at
  once; the output sums the kd terms from depth-shifted planes. The columns
  are kh*kw times the input (not kd*kh*kw: the depth taps come from the
  matmul's width), and XLA:CPU's matmul runs ~7x faster than its 3D conv."""
  b, d, h, w, c = x.shape
  kd, kh, kw, _, cout = kernel.shape
  sd, sh, sw = strides
  d_out, h_out, w_out = (d - kd) // sd + 1, (h - kh) // sh + 1, (w - kw) // sw + 1
  columns = jnp.concatenate(
      [x[:, :, j: j + (h_out - 1) * sh + 1: sh, k: k + (w_out - 1) * sw + 1: sw]
       for j in range(kh) for k in range(kw)], axis=-1)
  weights = kernel.transpose(1, 2, 3, 0, 4).reshape(kh * kw * c, kd * cout)
  terms = jnp.dot(columns, weights).reshape(b, d, h_out, w_out, kd, cout)
  out = None
  for tap in range(kd):
    term = terms[:, tap: tap + (d_out - 1) * sd + 1: sd, :, :, tap]
    out = term if out is None else out + term
  return out


def elu(x: jax.Array) -> jax.Array:
  """`jax.nn.elu` (alpha 1); on a CPU with exp(x) - 1 for expm1(x).

  XLA:CPU vectorises expm1 where it stands alone but not inside a fusion
  with other inputs: elu(a + b + c + s), the residual add's form, ran 8x
  slower than with exp (60 against 7 ms on 2x16x128x128x12, 2-core CPU),
  and ELUs fused into the edge pads and the group norms were most of the
  demo network's forward time. exp(x) - 1 is off by at most ~6e-8 absolute
  near 0 (expm1's reason to exist), far below what an activation of order
  1 resolves; the gradient is the same function, exp(x), at x = 0 too.
  Elsewhere the exact `jax.nn.elu`.
  """
  if traced_platform.name() != "cpu":
    return nn.elu(x)
  negative_part = jnp.where(x > 0, jnp.zeros_like(x), x)  # as jax.nn.elu: no inf * 0
  return jnp.where(x > 0, x, jnp.exp(negative_part) - 1)


def edge_pad(x: jax.Array, pads: Sequence[tuple[int, int]],
             one_pass: bool | None = None) -> jax.Array:
  """`jnp.pad(x, pads, mode="edge")` (replicate padding), on accelerators in
  one memory pass.

  jnp.pad pads one axis at a time by concatenation, and XLA:GPU writes each
  axis's result to memory: a 3x3x3 conv's input was copied two or three times
  before cuDNN read it (compiled for an H200, bench/gpu_compile.py). The
  one-pass form makes each axis a zero pad of the array plus zero pads of its
  first and last slices, placed where the copies go; pads and adds fuse into
  one loop, so the padded array is written once. Exact: every element gets
  exactly one nonzero term. XLA:CPU runs that loop 2.7x slower than the
  concatenation (it evaluates every pad's bounds per element), so
  `one_pass=None` means: unless the program is for a CPU.
  """
  if one_pass is None:
    one_pass = traced_platform.name() != "cpu"
  if not one_pass:
    return jnp.pad(x, pads, mode="edge")
  zero = jnp.zeros((), x.dtype)
  for axis, (lo, hi) in enumerate(pads):
    if not (lo or hi):
      continue
    n = x.shape[axis]
    config = lambda before, after, axis=axis, ndim=x.ndim: (
        [(0, 0, 0)] * axis + [(before, after, 0)] + [(0, 0, 0)] * (ndim - axis - 1))
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    last = lax.slice_in_dim(x, n - 1, n, axis=axis)
    out = lax.pad(x, zero, config(lo, hi))
    for i in range(lo):
      out = out + lax.pad(first, zero, config(i, n + lo + hi - 1 - i))
    for i in range(hi):
      out = out + lax.pad(last, zero, config(lo + n + i, hi - 1 - i))
    x = out
  return x


class Conv(nn.Module):
  """3D conv with edge-replication padding ("same" size at stride 1), as the
  original Res-UNET-R pads (replicate, then an unpadded conv). Orthogonal init."""
  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.orthogonal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    pads = [(0, 0)] + [(k // 2, k // 2) for k in self.kernel_size] + [(0, 0)]
    if any(p != (0, 0) for p in pads):
      x = edge_pad(x, pads)
    y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
               self.impl)
    return y + bias.astype(self.dtype)


NORMS = ("none", "group")


class GroupNorm(nn.Module):
  """GroupNorm of [batch, depth, height, width, channels]: per sample and
  group of `groups` contiguous channels, statistics over every voxel, in
  float32 (float64 for a float64 input) and in two passes (the mean, then the mean square of the
  deviations from it); a learnt scale and bias per channel. Parameters as
  flax's `nn.GroupNorm` names and shapes them ('scale', 'bias'), so states
  saved with either load into the other.

  Why not `nn.GroupNorm`: it reduces over a [..., groups, channels/groups]
  view of the activations, which XLA:CPU ran at ~0.5 GB/s (28 ms for one
  2x16x128x128x12 activation, 4.2x this form's 6.6 ms); here every reduction
  keeps the channels minor and the group sums happen on [batch, channels]
  vectors. And its one-pass variance, E[x^2] - E[x]^2 in float32, lost
  digits to cancellation where the mean is large against the spread (as
  after an ELU): 2.4e-4 off float64 there, this form 1.5e-6
  (docs/architecture.md "GroupNorm in two passes").
  """
  groups: int
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    per_group = c // self.groups
    count = per_group * int(np.prod(x.shape[1:-1]))
    as_channels = lambda v: jnp.repeat(v, per_group, axis=-1).reshape(
        b, *([1] * len(axes)), c)  # [b, groups] -> broadcastable [b, 1, 1, 1, c]
    group_sum = lambda v: v.sum(axes).reshape(b, self.groups, per_group).sum(-1)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
    # sums of x - (each channel's first voxel), not of x: where the mean is
    # large against the spread, a float32 sum of x loses the mean's low digits
    first = xf[(slice(None), *([slice(0, 1)] * len(axes)))]  # [b, 1, 1, 1, c]
    mean = as_channels(group_sum(xf - first) / count
                       + first.reshape(b, self.groups, per_group).mean(-1))
    deviation = xf - mean
    variance = group_sum(deviation * deviation) / count
    gain = as_channels(lax.rsqrt(variance + self.epsilon)) * scale
    return (deviation * gain + bias).astype(self.dtype)


class Norm(nn.Module):
  """Normalisation after a conv, before its activation (or residual add).

  "none": identity, no parameters (the original Res-UNET-R). "group":
  GroupNorm, statistics per sample over the whole patch and each group of
  channels (statistics in float32), a learnt scale and bias per channel. A
  prediction therefore depends a little on the window around it
  (docs/architecture.md "Normalisation").
  """
  kind: str = "none"
  groups: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "none":
      return x
    if self.kind == "group":
      return GroupNorm(self.groups, 1e-5, self.dtype, name="group_norm")(x)
    raise ValueError(f"unknown normalisation {self.kind!r}; one of {NORMS}")


def conv_then_norm(features: int, kernel: tuple[int, int, int], name: str, *,
                   strides: tuple[int, int, int] = (1, 1, 1), impl: str = "auto",
                   dtype: jnp.dtype = jnp.float32, norm: str = "none",
                   norm_groups: int = 4):
  """`Conv` named `name`, then its `Norm` named `<name>_norm`, as one callable.
  Call from inside a compact method: both become the caller's submodules."""
  conv = Conv(features, kernel, strides, impl=impl, dtype=dtype, name=name)
  normalise = Norm(norm, norm_groups, dtype, name=f"{name}_norm")
  return lambda x: normalise(conv(x))


class ResidualBlock(nn.Module):
  """3x3x3 conv -> [norm] -> ELU -> 3x3x3 conv -> [norm] -> + input (1x1x1
  projection if widths differ) -> ELU."""
  features: int
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  norm: str = "none"
  norm_groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda k, name: conv_then_norm(self.features, k, name, impl=self.impl,
                                          dtype=self.dtype, norm=self.norm,
                                          norm_groups=self.norm_groups)
    skip = x if x.shape[-1] == self.features else conv((1, 1, 1), "project")(x)
    y = elu(conv((3, 3, 3), "conv1")(x))
    y = conv((3, 3, 3), "conv2")(y)
    return elu(y + skip)


class AnisotropicBlock(nn.Module):
  """The paper's anisotropic conv block: 1x3x3 conv [+ norm] + ELU, then a
  residual block of two 3x3x3 convs whose skip runs from the first conv's
  output."""
  features: int
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  norm: str = "none"
  norm_groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = elu(conv_then_norm(self.features, (1, 3, 3), "conv_1x3x3", impl=self.impl,
                           dtype=self.dtype, norm=self.norm,
                           norm_groups=self.norm_groups)(x))
    return ResidualBlock(self.features, self.impl, self.dtype, self.norm,
                         self.norm_groups, name="residual")(x)


def bilinear_upsample_2x(x: jax.Array, axis: int) -> jax.Array:
  """Doubles `axis` like the original's fixed transposed conv (kernel 4,
  weights [.25, .75, .75, .25], stride 2, padding 1): out[2i] = .75 x[i] +
  .25 x[i-1], out[2i+1] = .75 x[i] + .25 x[i+1], with zeros outside, so the
  first and last rows come out attenuated (x .75), as in the original."""
  n = x.shape[axis]
  padded = jnp.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)])
  take = lambda start: lax.slice_in_dim(padded, start, start + n, axis=axis)
  previous, centre, following = take(0), take(1), take(2)
  even = 0.75 * centre + 0.25 * previous
  odd = 0.75 * centre + 0.25 * following
  stacked = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * n
  return stacked.reshape(shape)
