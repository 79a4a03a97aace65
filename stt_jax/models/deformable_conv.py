"""Deformable 2D convolution in pure jnp (bilinear sampling, zero padding).

out[n, h, w, o] = sum_{k, c} W[k, c, o] * m[n, h, w, g(c), k]
                  * X[n, h + ky(k) - kh//2 + dy, w + kx(k) - kw//2 + dx, c]

with (dy, dx) = offsets[n, h, w, g(c), k], sampled bilinearly, zero outside
the image (the paper's eq. 3; the modulation m is optional, off by default).
Channels are split into `offset_groups` contiguous groups that share offsets.
Gathers are plain jnp indexing (one row per sample from a table of 2x2
neighbourhoods), so it runs on any backend under jit, vmap and grad without
custom kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


def _neighbourhoods(x: jax.Array, groups: int, dtype: jnp.dtype) -> jax.Array:
  """x [n, h, w, c] -> rows [n * (h+1) * (w+1) * groups, 4 * c/groups].

  Row ((b * (h+1) + i) * (w+1) + j) * groups + g holds group g's channels of
  the 2x2 neighbourhood whose top-left pixel is (i-1, j-1), in a zero border:
  (i-1, j-1), (i-1, j), (i, j-1), (i, j). A bilinear sample is then one
  gather of one row, and in the gradient one scatter-add of one row: a quarter
  of the gathers, each four times wider, than one per corner.
  """
  n, h, w, c = x.shape
  padded = jnp.pad(x.astype(dtype).reshape(n, h, w, groups, c // groups),
                   ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  quads = jnp.concatenate([padded[:, :-1, :-1], padded[:, :-1, 1:],
                           padded[:, 1:, :-1], padded[:, 1:, 1:]], axis=-1)
  return quads.reshape(-1, 4 * (c // groups))


def _sample(table: jax.Array, index: jax.Array, weights: jax.Array) -> jax.Array:
  """Bilinear samples: table [rows, 4 * cg] (_neighbourhoods), index [p] (in
  range), weights [p, 4] (one per corner) -> [p, cg].

  Written as a product and a sum over the corner axis, not an einsum: XLA:GPU
  then computes the gradient's rows (cotangent x weights, [p, 4 * cg] in the
  table's layout) inside the scatter-add's fusion. The einsum's gradient came
  out in [p, cg, 4] order and XLA wrote it to memory twice, once as computed
  and once transposed (2 GB each per level-1 chunk of the paper's patch;
  compiled for an H200 without one, docs/architecture.md)."""
  vals = table.at[index].get(mode="promise_in_bounds").reshape(index.shape[0], 4, -1)
  return jnp.sum(vals * weights[:, :, None], axis=1)


def _sample_fwd(table, index, weights, *static):
  """The custom-gradient samplers' forward: _sample, keeping its inputs."""
  del static
  return _sample(table, index, weights), (table, index, weights)


def _reordered_gradient(residuals, cotangent, reorder, **scatter):
  """_sample's gradient (d_table, None, d_weights) with its scatter-add
  taking the samples in another order. reorder(index) -> (the rows the
  samples read, in that order; a function putting any per-sample array in
  that order); `scatter`: more arguments of the scatter-add."""
  table, index, weights = residuals
  cotangent = cotangent.astype(table.dtype)
  vals = table.at[index].get(mode="promise_in_bounds").reshape(index.shape[0], 4, -1)
  d_weights = jnp.sum(vals * cotangent[:, None, :], axis=-1).astype(weights.dtype)
  keys, permute = reorder(index)
  rows = permute(weights)[:, :, None].astype(table.dtype) * permute(cotangent)[:, None, :]
  d_table = jnp.zeros_like(table).at[keys].add(
      rows.reshape(index.shape[0], -1), mode="promise_in_bounds", **scatter)
  return d_table, None, d_weights


@jax.custom_vjp
def _sample_sorted_gradient(table: jax.Array, index: jax.Array, weights: jax.Array
                            ) -> jax.Array:
  """_sample whose gradient first sorts the samples by the row they read: the
  scatter-add then runs over sorted indices, which lets XLA's GPU emitter sum
  runs of equal rows in registers (one atomic per run instead of one per
  sample) at the price of a sort (CUB's radix sort on GPUs) and of permuting
  each sample's weights and cotangent (4 + cg values, not 4 * cg)."""
  return _sample(table, index, weights)


def _sample_sorted_bwd(residuals, cotangent):
  def by_row(index):
    keys, order = jax.lax.sort((index, jax.lax.iota(jnp.int32, index.shape[0])), num_keys=1)
    return keys, lambda a: a.at[order].get(mode="promise_in_bounds", unique_indices=True)
  return _reordered_gradient(residuals, cotangent, by_row, indices_are_sorted=True)


_sample_sorted_gradient.defvjp(_sample_fwd, _sample_sorted_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sample_tap_major_gradient(table: jax.Array, index: jax.Array, weights: jax.Array,
                               taps: int) -> jax.Array:
  """_sample whose gradient scatter-adds the samples tap by tap instead of
  pixel by pixel. The samples come pixel-major ([pixels, taps]), so the nine
  taps of neighbouring pixels, which read the same 2x2 neighbourhoods, reach
  the scatter-add one after another: atomic adds to the same rows, close in
  time. Taken tap-major ([taps, pixels]), consecutive samples read distinct,
  consecutive rows, and a row's nine readers lie all the slices apart. The
  price: the sample's weights, index and cotangent (4 + 1 + cg values) are
  transposed first; no sort. `taps`: the innermost sample axes' size
  (offset groups x kernel taps)."""
  return _sample(table, index, weights)


def _sample_tap_major_bwd(taps, residuals, cotangent):
  tap_major = lambda a: jnp.swapaxes(a.reshape(-1, taps, *a.shape[1:]), 0, 1).reshape(a.shape)
  return _reordered_gradient(residuals, cotangent, lambda index: (tap_major(index), tap_major))


_sample_tap_major_gradient.defvjp(_sample_fwd, _sample_tap_major_bwd)

# deformable_conv2d's `gradient`: the order its gradient's scatter-add takes
# the samples in (the same values; a speed choice, for GPUs)
GRADIENTS = ("scatter", "sorted", "tap_major")


def deformable_conv2d(x: jax.Array, offsets: jax.Array, kernel: jax.Array,
                      mask: jax.Array | None = None,
                      accumulate_dtype: jnp.dtype | None = jnp.float32,
                      gradient: str = "scatter") -> jax.Array:
  """Stride-1, 'same'-size deformable convolution.

  Args:
    x: [n, h, w, c] input.
    offsets: [n, h, w, groups, kh * kw, 2] sampling offsets (dy, dx) in pixels,
      taps in row-major kernel order.
    kernel: [kh, kw, c, c_out] weights.
    mask: optional [n, h, w, groups, kh * kw] modulation.
    accumulate_dtype: dtype the bilinear sampling and its gradient's
      scatter-add compute in (None: x's dtype); at least x's precision.
    gradient: the order the gradient's scatter-add takes the samples in, all
      the same values (a speed choice): "scatter" as sampled (pixel-major),
      "sorted" by the pixel they read (_sample_sorted_gradient), "tap_major"
      tap by tap (_sample_tap_major_gradient).
  Returns:
    [n, h, w, c_out].
  """
  n, h, w, c = x.shape
  kh, kw, _, c_out = kernel.shape
  groups, taps = offsets.shape[3], offsets.shape[4]
  if taps != kh * kw or c % groups:
    raise ValueError(f"offsets {offsets.shape} do not fit kernel {kernel.shape} "
                     f"and {c} channels")
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
  cg = c // groups
  accumulate = jnp.promote_types(x.dtype, accumulate_dtype or x.dtype)
  ky, kx = jnp.meshgrid(jnp.arange(kh) - kh // 2, jnp.arange(kw) - kw // 2,
                        indexing="ij")
  # positions in float32 (or wider) whatever x's dtype: bfloat16 has spacing
  # 1.0 from 128 to 256, so it would round a sample at x = 150.4 to 150
  offsets = offsets.astype(jnp.promote_types(offsets.dtype, jnp.float32))
  ys = (jnp.arange(h)[:, None, None, None] + ky.reshape(1, 1, 1, -1)) + offsets[..., 0]
  xs = (jnp.arange(w)[None, :, None, None] + kx.reshape(1, 1, 1, -1)) + offsets[..., 1]
  y0, x0 = jnp.floor(ys), jnp.floor(xs)          # [n, h, w, g, k]
  wy, wx = ys - y0, xs - x0
  # a top-left corner in [-1, h-1] x [-1, w-1] keeps a corner in the image;
  # anything further out has all four corners outside: weight zero
  inside = (y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)
  row = jnp.clip(y0, -1, h - 1).astype(jnp.int32) + 1
  col = jnp.clip(x0, -1, w - 1).astype(jnp.int32) + 1
  batch = jnp.arange(n, dtype=jnp.int32)[:, None, None, None, None]
  group = jnp.arange(groups, dtype=jnp.int32)[None, None, None, :, None]
  index = ((batch * (h + 1) + row) * (w + 1) + col) * groups + group
  table = _neighbourhoods(x, groups, accumulate)
  weights = jnp.stack([(1.0 - wy) * (1.0 - wx), (1.0 - wy) * wx,
                       wy * (1.0 - wx), wy * wx], axis=-1) * inside[..., None]
  sample = {"scatter": _sample, "sorted": _sample_sorted_gradient,
            "tap_major": functools.partial(_sample_tap_major_gradient,
                                           taps=groups * taps)}[gradient]
  columns = sample(table, index.reshape(-1), weights.reshape(-1, 4).astype(accumulate))
  columns = columns.reshape(n, h, w, groups, taps, cg).astype(x.dtype)
  if mask is not None:
    columns = columns * mask[..., None].astype(x.dtype)
  # one matrix product over a single flattened (group, tap, channel) axis, the
  # (small) kernel permuted to that order: given the three axes, XLA:GPU chose
  # to transpose the 9x wider columns instead (253 MB per level-1 chunk)
  weights = jnp.swapaxes(kernel.reshape(taps, groups, cg, c_out), 0, 1)
  out = columns.reshape(n * h * w, groups * taps * cg) @ weights.reshape(-1, c_out).astype(
      x.dtype)
  return out.reshape(n, h, w, c_out)


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
  gradient: str = "scatter"   # deformable_conv2d's; a speed choice

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
                          kernel.astype(self.dtype), mask,
                          gradient=self.gradient)
    return y + bias.astype(self.dtype)
