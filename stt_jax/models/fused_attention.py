"""Softmax attention for many queries and few keys, fused (Pallas; Triton on GPUs).

The spatial stream attends from every pixel of a slice (25,600 queries at the
paper's level 1) to at most kv_grid^2 pooled keys (256). XLA's attention
writes the [queries, keys] scores and probabilities to device memory several
times in the forward and the backward pass; by XLA's own cost analysis that
traffic is the largest of the SST block's (~31 GB per level-1 chunk, forward
and gradient). Here every key fits in one tile, so each program holds a block
of queries against all keys on chip: one pass, no online softmax, no score
matrix in memory. Backward (`Tuning.backward`, same function each way):
"query_major", each program walks a run of query blocks, writes their dQ and
sums dK, dV on chip, the runs' partial sums (a few MB) added in jnp;
"key_major", the same pass on transposed tiles ([keys, queries]), so the two
products that sum over queries need no transpose of a tile in registers and
only dQ's does; "split", a key-major pass for dK, dV alone plus a second
kernel, parallel over query blocks like the forward, for dQ (FlashAttention-2's
split: two more products, no transposes, many more programs for dQ).

q [batch, queries, heads, dim], k/v [batch, keys, heads, dim]; keys <= MAX_KEYS
and queries a multiple of 16 (`supported`). Same function as
`jax.nn.dot_product_attention` (scale 1/sqrt(dim)), float32 softmax. Off a GPU
Pallas' interpreter runs the same kernels (slow; for tests). float32 products
follow `jax_default_matmul_precision` as XLA's do: TF32 on a GPU unless it is
"highest"/"float32" (then IEEE float32, which the float64-reference tests need).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from stt_jax.models import traced_platform

MAX_KEYS = 256
_MIN_TILE = 16  # Triton's dot needs every tile dimension >= 16


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch parameters (not the function): float32 scores a program holds,
  queries x padded keys, in the forward and the backward pass (which keeps
  more of them alive); warps per program of each; most runs of query blocks the
  backward splits each (slice, head) into (more programs, more partial dK/dV
  sums); which backward kernels (BACKWARDS, module docstring). Defaults:
  session 33's choice, untuned on a GPU (bench/fused_attention_tune.py tunes
  them)."""
  forward_tile: int = 64 * 256
  backward_tile: int = 32 * 256
  forward_warps: int = 8
  backward_warps: int = 8
  max_runs: int = 16
  backward: str = "query_major"

  def __post_init__(self):
    if self.backward not in BACKWARDS:
      raise ValueError(f"Tuning.backward {self.backward!r}: one of {BACKWARDS}")


BACKWARDS = ("query_major", "key_major", "split")


DEFAULT_TUNING = Tuning()
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # exp() -> 0 without inf - inf
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "float32": jax.lax.Precision.HIGHEST,
               "high": jax.lax.Precision.HIGH, "tensorfloat32": jax.lax.Precision.HIGH,
               "bfloat16_3x": jax.lax.Precision.HIGH}


def matmul_precision() -> jax.lax.Precision:
  """The precision jnp's products get now (`jax.default_matmul_precision`)."""
  return _PRECISIONS.get(str(jax.config.jax_default_matmul_precision).lower(),
                         jax.lax.Precision.DEFAULT)


def _pow2_at_least(n: int) -> int:
  return max(_MIN_TILE, 1 << (int(n) - 1).bit_length())


def _query_block(queries: int, keys_padded: int, tile: int = DEFAULT_TUNING.backward_tile
                 ) -> int | None:
  block = max(_MIN_TILE, min(128, tile // keys_padded))
  while block >= _MIN_TILE:
    if queries % block == 0:
      return block
    block //= 2
  return None


def supported(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
              tuning: Tuning = DEFAULT_TUNING) -> bool:
  """Whether fused_attention takes these shapes ([b, queries, heads, dim])."""
  keys_padded = _pow2_at_least(k_shape[1])
  return (k_shape[1] <= MAX_KEYS and q_shape[-1] <= 128
          and all(_query_block(q_shape[1], keys_padded, tile) is not None
                  for tile in (tuning.forward_tile, tuning.backward_tile)))


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, keys: int,
                    dim: int, precision: jax.lax.Precision):
  dot = functools.partial(plgpu.dot, precision=precision)
  dim_padded, keys_padded = q_ref.shape[-1], k_ref.shape[0]
  head = (jnp.arange(dim_padded) < dim)[None, :]
  q = plgpu.load(q_ref, mask=head, other=0.0)
  k = plgpu.load(k_ref, mask=head, other=0.0)
  v = plgpu.load(v_ref, mask=head, other=0.0)
  s = dot(q, k, trans_b=True) * scale  # [block, keys_padded], float32
  s = jnp.where((jnp.arange(keys_padded) < keys)[None, :], s, _MASKED)
  m = jnp.max(s, axis=1)
  p = jnp.exp(s - m[:, None])
  l = jnp.sum(p, axis=1)
  o = dot(p.astype(v.dtype), v) / l[:, None]
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=head)
  lse_ref[...] = m + jnp.log(l)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *out_refs,
                     scale: float, keys: int, dim: int, block: int, blocks_per_run: int,
                     precision: jax.lax.Precision, key_major: bool):
  """One run of query blocks of one (slice, head): writes their dQ (when
  out_refs is (dq, dk, dv); (dk, dv) when a separate kernel computes dQ) and
  this run's partial dK, dV. key_major: the same products on transposed
  tiles, scores [keys, queries] instead of [queries, keys]."""
  dot = functools.partial(plgpu.dot, precision=precision)
  *dq_ref, dk_ref, dv_ref = out_refs
  dim_padded, keys_padded = q_ref.shape[-1], k_ref.shape[0]
  head = (jnp.arange(dim_padded) < dim)[None, :]
  key_axis = jnp.arange(keys_padded) < keys
  k = plgpu.load(k_ref, mask=head, other=0.0)
  v = plgpu.load(v_ref, mask=head, other=0.0)
  first = pl.program_id(0) * blocks_per_run

  def step(i, carry):
    dk, dv = carry
    rows = pl.dslice((first + i) * block, block)
    q = plgpu.load(q_ref.at[rows, :], mask=head, other=0.0)
    do = plgpu.load(do_ref.at[rows, :], mask=head, other=0.0)
    lse, delta = lse_ref[rows], delta_ref[rows]
    if key_major:
      st = jnp.where(key_axis[:, None], dot(k, q, trans_b=True) * scale, _MASKED)
      pt = jnp.exp(st - lse[None, :])  # softmax from the saved log-sum-exp
      dv = dv + dot(pt.astype(do.dtype), do)
      dst = pt * (dot(v, do, trans_b=True) - delta[None, :]) * scale
      dk = dk + dot(dst.astype(q.dtype), q)
      dq = dot(dst.astype(k.dtype), k, trans_a=True) if dq_ref else None
    else:
      s = jnp.where(key_axis[None, :], dot(q, k, trans_b=True) * scale, _MASKED)
      p = jnp.exp(s - lse[:, None])
      dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (dot(do, v, trans_b=True) - delta[:, None]) * scale
      dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
      dq = dot(ds.astype(k.dtype), k) if dq_ref else None
    if dq is not None:
      plgpu.store(dq_ref[0].at[rows, :], dq.astype(dq_ref[0].dtype), mask=head)
    return dk, dv

  zeros = jnp.zeros((keys_padded, dim_padded), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, blocks_per_run, step, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _query_gradient_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
                           scale: float, keys: int, dim: int, precision: jax.lax.Precision):
  """dQ of one block of queries (the "split" backward's second kernel)."""
  dot = functools.partial(plgpu.dot, precision=precision)
  dim_padded, keys_padded = q_ref.shape[-1], k_ref.shape[0]
  head = (jnp.arange(dim_padded) < dim)[None, :]
  q = plgpu.load(q_ref, mask=head, other=0.0)
  do = plgpu.load(do_ref, mask=head, other=0.0)
  k = plgpu.load(k_ref, mask=head, other=0.0)
  v = plgpu.load(v_ref, mask=head, other=0.0)
  s = jnp.where((jnp.arange(keys_padded) < keys)[None, :], dot(q, k, trans_b=True) * scale,
                _MASKED)
  p = jnp.exp(s - lse_ref[...][:, None])
  ds = p * (dot(do, v, trans_b=True) - delta_ref[...][:, None]) * scale
  plgpu.store(dq_ref, dot(ds.astype(k.dtype), k).astype(dq_ref.dtype), mask=head)


def _runs(blocks: int, max_runs: int) -> int:
  """Query blocks are split into this many runs per (batch, head): enough
  programs to fill a GPU, few partial dK/dV sums to add up."""
  return max(d for d in range(1, max_runs + 1) if blocks % d == 0)


def _forward(q, k, v, keys: int, interpret: bool, precision: jax.lax.Precision,
             tuning: Tuning):
  b, nq, h, dim = q.shape
  keys_padded = k.shape[1]
  dim_padded = _pow2_at_least(dim)
  block = _query_block(nq, keys_padded, tuning.forward_tile)
  kernel = functools.partial(_forward_kernel, scale=float(dim) ** -0.5, keys=keys, dim=dim,
                             precision=precision)
  rows = pl.BlockSpec((None, block, None, dim_padded), lambda i, j, n: (j, i, n, 0))
  whole = pl.BlockSpec((None, keys_padded, None, dim_padded), lambda i, j, n: (j, 0, n, 0))
  return pl.pallas_call(
      kernel, grid=(nq // block, b, h),
      in_specs=[rows, whole, whole],
      out_specs=[rows, pl.BlockSpec((None, None, block), lambda i, j, n: (j, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, nq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tuning.forward_warps, num_stages=2),
      interpret=interpret, name="fused_attention_forward")(q, k, v)


def _backward(q, k, v, o, lse, do, keys: int, interpret: bool,
              precision: jax.lax.Precision, tuning: Tuning):
  b, nq, h, dim = q.shape
  keys_padded = k.shape[1]
  dim_padded = _pow2_at_least(dim)
  block = _query_block(nq, keys_padded, tuning.backward_tile)
  runs = _runs(nq // block, tuning.max_runs)
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  shared = dict(scale=float(dim) ** -0.5, keys=keys, dim=dim, precision=precision)
  params = plgpu.CompilerParams(num_warps=tuning.backward_warps, num_stages=2)
  dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  kernel = functools.partial(_backward_kernel, block=block, blocks_per_run=nq // block // runs,
                             key_major=tuning.backward != "query_major", **shared)
  all_rows = pl.BlockSpec((None, nq, None, dim_padded), lambda r, j, n: (j, 0, n, 0))
  whole = pl.BlockSpec((None, keys_padded, None, dim_padded), lambda r, j, n: (j, 0, n, 0))
  per_row = pl.BlockSpec((None, None, nq), lambda r, j, n: (j, n, 0))
  partial = pl.BlockSpec((None, None, None, keys_padded, dim_padded),
                         lambda r, j, n: (r, j, n, 0, 0))
  partial_shape = jax.ShapeDtypeStruct((runs, b, h, keys_padded, dim_padded), jnp.float32)
  with_dq = tuning.backward != "split"
  grads = pl.pallas_call(
      kernel, grid=(runs, b, h),
      in_specs=[all_rows, whole, whole, all_rows, per_row, per_row],
      out_specs=[all_rows] * with_dq + [partial, partial],
      out_shape=[dq_shape] * with_dq + [partial_shape, partial_shape],
      compiler_params=params, interpret=interpret,
      name="fused_attention_backward")(q, k, v, do, lse, delta)
  dk, dv = grads[-2:]
  if with_dq:
    dq = grads[0]
  else:  # blocks of queries in parallel, as the forward (`whole` as above)
    rows = pl.BlockSpec((None, block, None, dim_padded), lambda i, j, n: (j, i, n, 0))
    per_row = pl.BlockSpec((None, None, block), lambda i, j, n: (j, n, i))
    dq = pl.pallas_call(
        functools.partial(_query_gradient_kernel, **shared), grid=(nq // block, b, h),
        in_specs=[rows, whole, whole, rows, per_row, per_row], out_specs=rows,
        out_shape=dq_shape, compiler_params=params, interpret=interpret,
        name="fused_attention_backward_dq")(q, k, v, do, lse, delta)
  # [runs, b, h, keys, dim] -> [b, keys, h, dim]
  unrun = lambda g: jnp.transpose(g.sum(0)[..., :dim], (0, 2, 1, 3))
  return dq, unrun(dk).astype(k.dtype), unrun(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, keys: int, interpret: bool, precision: jax.lax.Precision,
               tuning: Tuning):
  return _forward(q, k, v, keys, interpret, precision, tuning)[0]


def _attention_fwd(q, k, v, keys, interpret, precision, tuning):
  o, lse = _forward(q, k, v, keys, interpret, precision, tuning)
  return o, (q, k, v, o, lse)


def _attention_bwd(keys, interpret, precision, tuning, residuals, do):
  q, k, v, o, lse = residuals
  return _backward(q, k, v, o, lse, do, keys, interpret, precision, tuning)


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    interpret: bool | None = None,
                    tuning: Tuning = DEFAULT_TUNING) -> jax.Array:
  """softmax(q k^T / sqrt(dim)) v. q [b, queries, heads, dim], k/v [b, keys, heads, dim].

  interpret: Pallas' interpreter instead of Triton (default: when the
    program is not for a GPU).
  tuning: launch parameters (same function whatever they are).
  """
  if not supported(q.shape, k.shape, tuning):
    raise ValueError(f"fused_attention takes <= {MAX_KEYS} keys, head dim <= 128 and a "
                     f"multiple of 16 queries; got q {q.shape}, k {k.shape}")
  if interpret is None:
    interpret = traced_platform.name() != "gpu"
  keys = k.shape[1]
  pad = ((0, 0), (0, _pow2_at_least(keys) - keys), (0, 0), (0, 0))
  # read at trace time, like jnp's products: the backward keeps the forward's
  return _attention(q, jnp.pad(k, pad), jnp.pad(v, pad), keys, interpret, matmul_precision(),
                    tuning)
