"""Deformable 2D convolution in pure jnp (bilinear sampling, zero padding).

out[n, h, w, o] = sum_{k, c} W[k, c, o] * m[n, h, w, g(c), k]
                  * X[n, h + ky(k) - kh//2 + dy, w + kx(k) - kw//2 + dx, c]

with (dy, dx) = offsets[n, h, w, g(c), k], sampled bilinearly, zero outside
the image (the paper's eq. 3; the modulation m is optional, off by default).
Channels are split into `offset_groups` contiguous groups that share offsets.
Gathers are written with `jnp.take_along_axis`, so it runs on any backend
under jit, vmap and grad without custom kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def _bilinear_gather(image: jax.Array, ys: jax.Array, xs: jax.Array,
                     accumulate_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Samples image [h, w, c] at float positions ys, xs [p] -> [p, c].

  One gather per position of its whole 2x2 neighbourhood (4c values in a
  row), from a copy holding each pixel with its right, lower and lower-right
  neighbours and a zero border: a quarter of the gathers, each four times
  wider, than one per corner, and in the gradient a quarter of the
  scatter-adds. Positions whose whole neighbourhood lies outside get zero.

  The copy and the weighting are in `accumulate_dtype`, so the gradient's
  scatter-add (each pixel gets ~36 contributions for a 3x3 kernel) sums in
  float32 even for a bfloat16 image, as torchvision's deform_conv2d does
  under autocast; the result is cast back to the image's dtype.
  """
  h, w, c = image.shape
  padded = jnp.pad(image.astype(accumulate_dtype), ((1, 1), (1, 1), (0, 0)))
  quads = jnp.concatenate([padded[:-1, :-1], padded[:-1, 1:],     # [h+1, w+1, 4c]
                           padded[1:, :-1], padded[1:, 1:]], axis=-1)
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  wy, wx = ys - y0, xs - x0
  # a top-left corner in [-1, h-1] x [-1, w-1] keeps a corner in the image;
  # its neighbourhood is quads[y0 + 1, x0 + 1]
  inside = (y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)
  row = jnp.clip(y0, -1, h - 1).astype(jnp.int32) + 1
  col = jnp.clip(x0, -1, w - 1).astype(jnp.int32) + 1
  vals = jnp.take(quads.reshape(-1, 4 * c), row * (w + 1) + col, axis=0).reshape(-1, 4, c)
  weights = jnp.stack([(1.0 - wy) * (1.0 - wx), (1.0 - wy) * wx,
                       wy * (1.0 - wx), wy * wx], axis=-1) * inside[:, None]
  return jnp.einsum("pkc,pk->pc", vals, weights.astype(vals.dtype)).astype(image.dtype)


def deformable_conv2d(x: jax.Array, offsets: jax.Array, kernel: jax.Array,
                      mask: jax.Array | None = None,
                      accumulate_dtype: jnp.dtype | None = jnp.float32) -> jax.Array:
  """Stride-1, 'same'-size deformable convolution.

  Args:
    x: [n, h, w, c] input.
    offsets: [n, h, w, groups, kh * kw, 2] sampling offsets (dy, dx) in pixels,
      taps in row-major kernel order.
    kernel: [kh, kw, c, c_out] weights.
    mask: optional [n, h, w, groups, kh * kw] modulation.
    accumulate_dtype: dtype the bilinear sampling and its gradient's
      scatter-add compute in (None: x's dtype); at least x's precision.
  Returns:
    [n, h, w, c_out].
  """
  n, h, w, c = x.shape
  kh, kw, _, c_out = kernel.shape
  groups, taps = offsets.shape[3], offsets.shape[4]
  if taps != kh * kw or c % groups:
    raise ValueError(f"offsets {offsets.shape} do not fit kernel {kernel.shape} "
                     f"and {c} channels")
  ky, kx = jnp.meshgrid(jnp.arange(kh) - kh // 2, jnp.arange(kw) - kw // 2,
                        indexing="ij")
  base_y = jnp.arange(h)[:, None, None] + ky.reshape(1, 1, -1)   # [h, 1, k]
  base_x = jnp.arange(w)[None, :, None] + kx.reshape(1, 1, -1)   # [1, w, k]
  # positions in float32 (or wider) whatever x's dtype: bfloat16 has spacing 1.0 from 128
  # to 256, so it would round a sample at x = 150.4 to 150
  offsets = offsets.astype(jnp.promote_types(offsets.dtype, jnp.float32))
  ys = base_y[:, :, None, :] + offsets[..., 0]   # [n, h, w, g, k]
  xs = base_x[:, :, None, :] + offsets[..., 1]
  cg = c // groups
  grouped = x.reshape(n, h, w, groups, cg)

  accumulate = jnp.promote_types(x.dtype, accumulate_dtype or x.dtype)

  def sample_one(img, y, x_):  # img [h, w, cg], y/x [h, w, k] -> [h, w, k, cg]
    vals = _bilinear_gather(img, y.reshape(-1), x_.reshape(-1), accumulate)
    return vals.reshape(h, w, taps, cg)

  # over batch, then groups: columns [n, g, h, w, k, cg]
  sample_groups = jax.vmap(sample_one, in_axes=(2, 2, 2))
  columns = jax.vmap(sample_groups)(grouped, ys, xs)
  if mask is not None:
    columns = columns * jnp.moveaxis(mask, 3, 1)[..., None].astype(x.dtype)
  weights = kernel.reshape(taps, groups, cg, c_out)
  return jnp.einsum("nghwkc,kgco->nhwo", columns, weights.astype(x.dtype))


class DeformableConv(nn.Module):
  """3x3 (by default) deformable conv whose offsets come from a guide tensor.

  __call__(x, guide): x [n, h, w, c] is sampled; guide [n, h, w, c_g] predicts
  the offsets (and the modulation, if enabled) with a plain conv initialised to
  zero, so training starts from an ordinary convolution.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  offset_groups: int = 1
  modulation: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, guide: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    taps = kh * kw
    n, h, w, c = x.shape
    predict = nn.Conv(self.offset_groups * taps * (3 if self.modulation else 2),
                      (kh, kw), padding="SAME", kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, name="offset_conv")(guide)
    offsets = predict[..., :self.offset_groups * taps * 2].reshape(
        n, h, w, self.offset_groups, taps, 2)
    mask = None
    if self.modulation:
      mask = 2.0 * jax.nn.sigmoid(predict[..., self.offset_groups * taps * 2:].reshape(
          n, h, w, self.offset_groups, taps))  # 1.0 at init
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = deformable_conv2d(x.astype(self.dtype), offsets.astype(self.dtype),
                          kernel.astype(self.dtype), mask)
    return y + bias.astype(self.dtype)
