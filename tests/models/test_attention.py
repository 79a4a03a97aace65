"""Attention streams against naive einsum/softmax references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.models import attention


def _softmax(a, axis=-1):
  a = a - a.max(axis=axis, keepdims=True)
  e = np.exp(a)
  return e / e.sum(axis=axis, keepdims=True)


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _mha(q, k, v, heads):
  """q [n, lq, c], k/v [n, lk, c] -> [n, lq, c], naive multi-head attention."""
  n, lq, c = q.shape
  d = c // heads
  qh = q.reshape(n, lq, heads, d)
  kh = k.reshape(n, -1, heads, d)
  vh = v.reshape(n, -1, heads, d)
  scores = np.einsum("nqhd,nkhd->nhqk", qh, kh) / np.sqrt(d)
  return np.einsum("nhqk,nkhd->nqhd", _softmax(scores), vh).reshape(n, lq, c)


def _spatial_ref(params, x, heads, r):
  b, t, h, w, c = x.shape
  planes = x.reshape(b * t, h, w, c)
  # average pooling with stride r, windows clipped at the border
  hp, wp = -(-h // r), -(-w // r)
  pad_h, pad_w = hp * r - h, wp * r - w
  top, left = pad_h // 2, pad_w // 2
  pooled = np.zeros((b * t, hp, wp, c))
  for i in range(hp):
    for j in range(wp):
      ys = slice(max(i * r - top, 0), min(i * r - top + r, h))
      xs = slice(max(j * r - left, 0), min(j * r - left + r, w))
      pooled[:, i, j] = planes[:, ys, xs].mean(axis=(1, 2))
  q = _dense(params["query"], planes.reshape(b * t, h * w, c))
  kv = pooled.reshape(b * t, -1, c)
  out = _mha(q, _dense(params["key"], kv), _dense(params["value"], kv), heads)
  return _dense(params["out"], out).reshape(b, t, h, w, c)


def _temporal_ref(params, x, heads):
  b, t, h, w, c = x.shape
  seq = np.moveaxis(x, 1, 3).reshape(b * h * w, t, c)
  out = _mha(*(_dense(params[n], seq) for n in ("query", "key", "value")), heads)
  out = _dense(params["out"], out).reshape(b, h, w, t, c)
  return np.moveaxis(out, 3, 1)


@pytest.mark.parametrize("implementation", ["auto", "xla", "heads_major", "unrolled"])
@pytest.mark.parametrize("shape,kv_grid", [((2, 3, 5, 7, 8), 16), ((1, 5, 9, 11, 8), 4),
                                           ((1, 2, 8, 8, 8), 4)])
def test_spatial_stream_matches_naive_reference(shape, kv_grid, implementation):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  module = attention.SpatialAttention(num_heads=2, kv_grid=kv_grid,
                                      implementation=implementation)
  params = module.init(jax.random.key(0), x)
  got = np.asarray(module.apply(params, x))
  r = attention.kv_pool_factor(shape[2], shape[3], kv_grid)
  ref = _spatial_ref(params["params"], x.astype(np.float64), 2, r)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("implementation", ["auto", "xla", "heads_major", "unrolled"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 8), (1, 7, 5, 3, 4)])
def test_temporal_stream_matches_naive_reference(shape, implementation):
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  module = attention.TemporalAttention(num_heads=2, implementation=implementation)
  params = module.init(jax.random.key(0), x)
  got = np.asarray(module.apply(params, x))
  ref = _temporal_ref(params["params"], x.astype(np.float64), 2)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("attend", [attention.heads_major_attention,
                                    attention.unrolled_keys_attention],
                         ids=["heads_major", "unrolled"])
def test_attention_gradients_match_closed_forms(attend):
  """d/dq, d/dk, d/dv of sum(g * attention(q, k, v)) against the textbook
  softmax-attention backward pass in float64 numpy; bf16 inputs keep float32
  scores (as XLA's path does)."""
  rng = np.random.default_rng(2)
  n, lq, lk, heads, d = 3, 7, 5, 2, 4
  q, g = (rng.standard_normal((n, lq, heads, d)) for _ in range(2))
  k, v = (rng.standard_normal((n, lk, heads, d)) for _ in range(2))
  f = lambda *a: jnp.sum(jnp.asarray(g, jnp.float32) * attend(*a))
  got = jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  scores = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d)
  p = _softmax(scores)
  dv = np.einsum("nhqk,nqhd->nkhd", p, g)
  dp = np.einsum("nqhd,nkhd->nhqk", g, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
  dq = np.einsum("nhqk,nkhd->nqhd", ds, k)
  dk = np.einsum("nhqk,nqhd->nkhd", ds, q)
  for a, b in zip(got, (dq, dk, dv)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
  half = tuple(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  out = attend(*half)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.einsum("nhqk,nkhd->nqhd", p, v), atol=0.05)
  half_f = lambda *a: jnp.sum(jnp.asarray(g, jnp.bfloat16) * attend(*a))
  for a, b in zip(jax.grad(half_f, argnums=(0, 1, 2))(*half), (dq, dk, dv)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1 * np.abs(b).max())


def _has_matrix_product(keys: int) -> bool:
  q = jnp.zeros((2, 6, 2, 4))
  kv = jnp.zeros((2, keys, 2, 4))
  jaxpr = jax.make_jaxpr(lambda q, k, v: attention.attend(q, k, v, "auto"))(q, kv, kv)
  return "dot_general" in str(jaxpr)


def test_auto_on_a_cpu_unrolls_a_few_keys_only():
  """auto: keys one by one (no matrix product) up to UNROLLED_MAX_KEYS, the
  heads-major matrix products beyond (the unrolled program grows with them)."""
  assert jax.default_backend() == "cpu"
  most = attention.UNROLLED_MAX_KEYS
  assert not _has_matrix_product(1) and not _has_matrix_product(most)
  assert _has_matrix_product(most + 1) and _has_matrix_product(64)


def test_unrolled_asked_for_keeps_matrix_products_past_its_limit():
  """"unrolled" outright unrolls up to UNROLLED_MOST_KEYS keys (a term per
  key: 256 would take minutes to compile), computes heads_major's beyond."""
  q = jnp.zeros((1, 3, 2, 4))
  for keys, unrolled in ((attention.UNROLLED_MOST_KEYS, True),
                         (attention.UNROLLED_MOST_KEYS + 1, False)):
    kv = jnp.zeros((1, keys, 2, 4))
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.attend(q, k, v, "unrolled"))(q, kv, kv)
    assert ("dot_general" not in str(jaxpr)) == unrolled


def _perturbed(params, seed=0):
  """Random parameters everywhere (the output projection starts at zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("fusion,chunks", [("add", 1), ("concat", 1), ("deform", 1),
                                          ("add", 3), ("deform", 3)])
def test_split_block_streams_are_independent_and_odd_shapes_work(fusion, chunks):
  x = np.random.default_rng(2).standard_normal((1, 5, 7, 9, 8)).astype(np.float32)
  block = attention.SSTBlock(design="split", fusion=fusion, num_heads=2, kv_grid=4,
                             deform_groups=2, chunks=chunks)
  params = _perturbed(block.init(jax.random.key(0), x))
  out = block.apply(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
  if fusion != "add":
    return
  # x + proj(spatial(y) + temporal(y)): each stream sees y, not the other's output
  p = params["params"]
  y = x.astype(np.float64)
  mean = y.mean(-1, keepdims=True)
  var = y.var(-1, keepdims=True)
  y = (y - mean) / np.sqrt(var + 1e-6) * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
  y = y + np.asarray(attention.position_encoding(5, 7, 9, 8))
  fused = (_spatial_ref(p["spatial"], y, 2, attention.kv_pool_factor(7, 9, 4))
           + _temporal_ref(p["temporal"], y, 2))
  ref = x + _dense(p["proj"], fused)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=5e-4, atol=5e-4)


def test_split_is_invariant_to_stream_order_and_cascades_are_not():
  x = np.random.default_rng(3).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
  split = attention.SSTBlock(design="split", fusion="add", num_heads=2, kv_grid=4)
  params = _perturbed(split.init(jax.random.key(0), x))
  p = params["params"]
  norm = jax.nn.standardize(jnp.asarray(x), axis=-1, epsilon=1e-6)
  y = norm * p["norm"]["scale"] + p["norm"]["bias"] + attention.position_encoding(4, 6, 6, 8)
  spatial = lambda v: attention.SpatialAttention(2, 4).apply({"params": p["spatial"]}, v)
  temporal = lambda v: attention.TemporalAttention(2).apply({"params": p["temporal"]}, v)
  proj = lambda v: v @ p["proj"]["kernel"] + p["proj"]["bias"]
  xs_first = spatial(y); xt_second = temporal(y)
  xt_first = temporal(y); xs_second = spatial(y)
  out = np.asarray(split.apply(params, x))
  np.testing.assert_allclose(np.asarray(x + proj(xs_first + xt_second)), out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x + proj(xs_second + xt_first)), out, rtol=1e-5, atol=1e-5)
  cascade = {"params": {k: v for k, v in p.items()}}
  a = np.asarray(attention.SSTBlock("spatial_then_temporal", num_heads=2, kv_grid=4).apply(cascade, x))
  b = np.asarray(attention.SSTBlock("temporal_then_spatial", num_heads=2, kv_grid=4).apply(cascade, x))
  np.testing.assert_allclose(a, np.asarray(x + proj(temporal(spatial(y)))), rtol=1e-5, atol=1e-5)
  assert np.abs(a - b).max() > 1e-3 and np.abs(a - out).max() > 1e-3


def test_fresh_block_is_the_identity():
  x = np.random.default_rng(4).standard_normal((1, 3, 8, 8, 8)).astype(np.float32)
  for design in ("split", "spatial_then_temporal", "temporal_then_spatial"):
    block = attention.SSTBlock(design=design, fusion="deform", num_heads=2, kv_grid=4)
    params = block.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(block.apply(params, x)), x)


@pytest.mark.parametrize("design", ["split", "temporal_then_spatial"])
def test_chunked_block_has_the_same_parameters_function_and_gradients(design):
  x = np.random.default_rng(5).standard_normal((2, 4, 12, 10, 8)).astype(np.float32)
  whole = attention.SSTBlock(design=design, fusion="deform", num_heads=2, kv_grid=4,
                             deform_groups=2)
  pieces = attention.SSTBlock(design=design, fusion="deform", num_heads=2, kv_grid=4,
                              deform_groups=2, chunks=4)
  params = _perturbed(jax.jit(whole.init)(jax.random.key(0), x))
  shapes = lambda t: jax.tree_util.tree_map(lambda v: v.shape, t)
  assert shapes(jax.eval_shape(pieces.init, jax.random.key(0), x)) == shapes(params)
  np.testing.assert_allclose(np.asarray(jax.jit(pieces.apply)(params, x)),
                             np.asarray(jax.jit(whole.apply)(params, x)), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
  g_whole = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss(whole)))(params))
  g_pieces = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss(pieces)))(params))
  scale = max(float(np.abs(g).max()) for g in g_whole)
  for a, b in zip(g_whole, g_pieces):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6 * scale)


def test_chunks_cut_the_gradients_planned_scratch():
  x = jax.ShapeDtypeStruct((2, 8, 32, 32, 8), jnp.float32)

  def scratch(chunks):
    block = attention.SSTBlock(fusion="deform", num_heads=2, kv_grid=8, chunks=chunks)
    params = jax.eval_shape(lambda v: block.init(jax.random.key(0), v), x)
    grad = jax.jit(jax.grad(lambda p, v: jnp.sum(block.apply(p, v) ** 2)))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes

  assert scratch(8) < 0.6 * scratch(1)
