"""Split spatio-temporal attention (the paper's SST module, Fig. 2b).

Activations are [batch, time (= depth), height, width, channels].

* spatial stream: multi-head self-attention among the H x W tokens of each
  slice. Queries keep full resolution; keys and values are average-pooled so
  that a slice offers at most `kv_grid` x `kv_grid` of them (pooled keys and
  values, as in PVT's spatial-reduction attention). Every query still sees the
  whole slice, so the receptive field stays global, at O(HW * kv_grid^2) cost
  instead of O((HW)^2): 32x320x320 full attention would need a 102,400^2 score
  matrix per slice.
* temporal stream: multi-head self-attention among the T tokens at each (h, w).
* both read the same normalised input plus fixed sinusoidal position
  encodings (resolution-free, so inference windows may differ from training
  patches), run in parallel ("split") and are fused by addition, a 1x1 conv
  over their concatenation, or a deformable conv that samples the spatial
  stream at offsets predicted from the temporal one (eq. 3);
* the cascaded designs of Table 5 feed one stream's output to the other;
* the block is residual with a zero-initialised output projection, so a fresh
  STT-UNET computes exactly the baseline's function.

Memory: `chunks` > 1 runs the spatial stream and the deformable fusion over
the B*T slices, and the temporal stream over the B*H pixel rows, in that many
sequential pieces (`nn.scan`), each rematerialised in the backward pass, so
only one piece's scores, probabilities and gathered columns are alive at a
time. Same parameters, same function; a schedule, not a model change.

Attention itself is `jax.nn.dot_product_attention`; `implementation` "auto"
is XLA's lowering, on CPUs in the form "heads_major" (the same einsums and
softmax with the heads moved ahead of the tokens, [batch, heads, tokens, dim]:
XLA:CPU's reductions over keys then run along contiguous rows: the level-1
spatial streams of the tiny binned VNC III STT-UNET's train step 1.91x
faster, the step 1.18x, docs/architecture.md "Heads-major attention on
CPUs"), and for up to UNROLLED_MAX_KEYS keys "unrolled" (one key at a time,
elementwise: that model's 4-section temporal streams 5x cheaper with
YNNPACK's reductions off too, its step 1.04-1.17x faster again; "Unrolled
keys" there). On an H100 cuDNN's fused kernel ("cudnn", opt-in) was no faster for
these short sequences and its bf16 gradients disagreed with XLA's
(bench/attention_impl.py; docs/architecture.md). "pallas" (opt-in) runs the
spatial stream, many queries against <= 256 pooled keys, through
models/fused_attention.py's kernels, which keep the score matrix on chip; the
temporal stream (32 against 32) stays XLA's unless `temporal_implementation`
says otherwise: compiled for an H200, the kernel would write 8.7 GiB less per
paper train step than XLA's scores and probabilities, but for 32x32 tiles,
204,800 programs a level-1 chunk; whether that is faster is for a GPU to say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from stt_jax.models import traced_platform
from stt_jax.models.deformable_conv import DeformableConv

DESIGNS = ("none", "split", "spatial_then_temporal", "temporal_then_spatial")
FUSIONS = ("add", "concat", "deform")


def sinusoidal_encoding(length: int, dim: int) -> jax.Array:
  """[length, dim] sine/cosine encoding of positions 0..length-1."""
  half = max(dim // 2, 1)
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
  angles = jnp.arange(length)[:, None] * freqs[None, :]
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return enc[:, :dim] if enc.shape[-1] >= dim else jnp.pad(enc, ((0, 0), (0, dim - enc.shape[-1])))


def position_encoding(t: int, h: int, w: int, dim: int) -> jax.Array:
  """[t, h, w, dim]: a third of the channels each for t, y and x."""
  d_t = dim // 3
  d_y = (dim - d_t) // 2
  d_x = dim - d_t - d_y
  enc_t = jnp.broadcast_to(sinusoidal_encoding(t, d_t)[:, None, None], (t, h, w, d_t))
  enc_y = jnp.broadcast_to(sinusoidal_encoding(h, d_y)[None, :, None], (t, h, w, d_y))
  enc_x = jnp.broadcast_to(sinusoidal_encoding(w, d_x)[None, None, :], (t, h, w, d_x))
  return jnp.concatenate([enc_t, enc_y, enc_x], axis=-1)


def kv_pool_factor(h: int, w: int, kv_grid: int) -> int:
  """Pooling stride so that a slice offers at most kv_grid^2 keys/values."""
  return max(1, math.ceil(max(h, w) / kv_grid))


IMPLEMENTATIONS = ("auto", "xla", "heads_major", "unrolled", "cudnn", "pallas")
# "auto" on a CPU: "unrolled" up to this many keys, "heads_major" beyond
UNROLLED_MAX_KEYS = 8
# "unrolled" asked for outright: up to this many keys (its program holds a
# term per key: 256 did not compile in 10 minutes), heads_major beyond
UNROLLED_MOST_KEYS = 32


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """XLA's softmax attention computed as [batch, heads, tokens, dim].

  q [batch, queries, heads, dim], k/v [batch, keys, heads, dim] -> like q.
  Scores and softmax in float32 whatever the inputs' dtype, as
  `jax.nn.dot_product_attention`'s XLA path.
  """
  to_heads = lambda a: jnp.swapaxes(a, 1, 2)
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bnqd,bnkd->bnqk", to_heads(q), to_heads(k),
                      preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return to_heads(jnp.einsum("bnqk,bnkd->bnqd", weights, to_heads(v)))


def unrolled_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention taken one key at a time, with no matrix product.

  q [batch, queries, heads, dim], k/v [batch, keys, heads, dim] -> like q.
  Each key's scores are a multiply and a sum over dim, the softmax and the
  weighted sum of values elementwise over [batch, queries, heads]: for a
  handful of keys (the temporal stream of a 4- to 8-section patch) XLA:CPU
  runs it as a few fused loops, where its batched products of 4 x 4 matrices
  crawled (docs/architecture.md "Unrolled keys"). Its program grows with the
  number of keys: for short sequences only. Float32 scores and sums, as
  heads_major_attention.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
  keys = range(k.shape[1])
  scores = [jnp.sum(qf * kf[:, j:j + 1], axis=-1) * scale for j in keys]   # [b, q, n]
  # the shift leaves the softmax unchanged; as jax.nn.softmax, no gradient through it
  top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, scores))
  exps = [jnp.exp(s - top) for s in scores]
  total = functools.reduce(jnp.add, exps)
  out = functools.reduce(jnp.add, [e[..., None] * vf[:, j:j + 1] for j, e in zip(keys, exps)])
  return (out / total[..., None]).astype(v.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
  """Softmax attention. q [batch, queries, heads, dim], k/v [batch, keys, heads, dim]."""
  if implementation == "auto":
    if traced_platform.name() != "cpu":
      implementation = "xla"
    else:
      implementation = "unrolled" if k.shape[1] <= UNROLLED_MAX_KEYS else "heads_major"
  if implementation == "heads_major":
    return heads_major_attention(q, k, v)
  if implementation == "unrolled":
    if k.shape[1] <= UNROLLED_MOST_KEYS:
      return unrolled_keys_attention(q, k, v)
    return heads_major_attention(q, k, v)
  if implementation == "pallas":
    # imported here: the default path needs no Pallas/Triton at all
    from stt_jax.models import fused_attention  # pylint: disable=g-import-not-at-top
    if fused_attention.supported(q.shape, k.shape):
      return fused_attention.fused_attention(q, k, v)
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def chunked_apply(module: nn.Module, chunks: int, *inputs: jax.Array) -> jax.Array:
  """module(*inputs) with the inputs' leading axis cut into (at most) `chunks`
  equal pieces run one after another, each recomputed in the backward pass.

  The module must act on each leading index independently; its parameters are
  shared by the pieces (broadcast), so the parameter tree is module(*inputs)'s.
  """
  n = inputs[0].shape[0]
  pieces = _largest_divisor(n, chunks)
  if pieces == 1:
    return module(*inputs)

  def body(mdl, carry, xs):
    return carry, mdl(*xs)

  scan = nn.scan(nn.remat(body), variable_broadcast="params",
                 split_rngs={"params": False}, length=pieces)
  xs = tuple(x.reshape(pieces, n // pieces, *x.shape[1:]) for x in inputs)
  _, y = scan(module, None, xs)
  return y.reshape(n, *y.shape[2:])


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class SpatialAttention(nn.Module):
  """Self-attention among the tokens of each slice, pooled keys/values."""
  num_heads: int
  kv_grid: int = 16
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    planes = x.reshape(b * t, h, w, c)
    r = kv_pool_factor(h, w, self.kv_grid)
    pooled = planes if r == 1 else nn.avg_pool(planes, (r, r), (r, r), padding="SAME",
                                                count_include_pad=False)
    q = _heads(dense("query")(planes).reshape(b * t, h * w, c), self.num_heads)
    kv = pooled.reshape(b * t, -1, c)
    k = _heads(dense("key")(kv), self.num_heads)
    v = _heads(dense("value")(kv), self.num_heads)
    out = attend(q, k, v, self.implementation)
    return dense("out")(out.reshape(b * t, h * w, c)).reshape(b, t, h, w, c)


class TemporalAttention(nn.Module):
  """Self-attention among the T tokens at each (h, w)."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    seq = jnp.moveaxis(x, 1, 3).reshape(b * h * w, t, c)
    q, k, v = (_heads(dense(n)(seq), self.num_heads) for n in ("query", "key", "value"))
    out = attend(q, k, v, self.implementation).reshape(b * h * w, t, c)
    out = dense("out")(out).reshape(b, h, w, t, c)
    return jnp.moveaxis(out, 3, 1)


class SSTBlock(nn.Module):
  """x + proj(fuse(spatial(y), temporal(y))), y = LayerNorm(x) + positions."""
  design: str = "split"
  fusion: str = "deform"
  num_heads: int = 4
  kv_grid: int = 16
  deform_groups: int = 4
  deform_modulation: bool = False
  deform_gradient: str = "scatter"   # deformable_conv.GRADIENTS; a speed choice
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"
  temporal_implementation: str = "auto"   # auto: implementation's, XLA's for pallas
  chunks: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    heads = math.gcd(self.num_heads, c)
    y = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    y = y + position_encoding(t, h, w, c).astype(y.dtype)
    spatial_module = SpatialAttention(heads, self.kv_grid, self.dtype, self.implementation,
                                      name="spatial")
    temporal_impl = self.temporal_implementation
    if temporal_impl == "auto":  # the fused kernel only for the spatial stream until timed
      temporal_impl = "xla" if self.implementation == "pallas" else self.implementation
    temporal_module = TemporalAttention(heads, self.dtype, temporal_impl, name="temporal")

    def spatial(v):  # slices one by one: [b*t, 1, h, w, c]
      out = chunked_apply(spatial_module, self.chunks, v.reshape(b * t, 1, h, w, c))
      return out.reshape(b, t, h, w, c)

    def temporal(v):  # rows of pixels: [h*b, t, 1, w, c]
      if self.chunks <= 1:
        return temporal_module(v)
      rows = jnp.transpose(v, (2, 0, 1, 3, 4)).reshape(h * b, t, 1, w, c)
      out = chunked_apply(temporal_module, self.chunks, rows).reshape(h, b, t, w, c)
      return jnp.transpose(out, (1, 2, 0, 3, 4))

    if self.design == "split":
      fused = self._fuse(spatial(y), temporal(y))
    elif self.design == "spatial_then_temporal":
      fused = temporal(spatial(y))
    elif self.design == "temporal_then_spatial":
      fused = spatial(temporal(y))
    else:
      raise ValueError(f"unknown attention design {self.design!r}")
    out = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                   name="proj")(fused)
    return x + out.astype(x.dtype)

  def _fuse(self, xs: jax.Array, xt: jax.Array) -> jax.Array:
    b, t, h, w, c = xs.shape
    if self.fusion == "add":
      return xs + xt
    if self.fusion == "concat":
      return nn.Dense(c, dtype=self.dtype, name="concat_fuse")(
          jnp.concatenate([xs, xt], axis=-1))
    if self.fusion == "deform":
      groups = math.gcd(self.deform_groups, c)
      fuse = DeformableConv(c, (3, 3), groups, self.deform_modulation, self.dtype,
                            gradient=self.deform_gradient,
                            name="deform_fuse")
      out = chunked_apply(fuse, self.chunks, xs.reshape(b * t, h, w, c),
                          xt.reshape(b * t, h, w, c))
      return out.reshape(b, t, h, w, c)
    raise ValueError(f"unknown fusion {self.fusion!r}")
