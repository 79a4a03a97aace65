"""The fused (Pallas) attention against a float64 numpy reference: values and
the gradients of q, k and v; its use in the SST block; its Triton lowering.

Off a GPU the kernels run in Pallas' interpreter, so the numbers checked here
are those of the same kernel bodies Triton compiles on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.models import attention, fused_attention


def _reference(q, k, v, weight):
  """float64: o = softmax(q k^T / sqrt(d)) v, and the gradients of sum(weight * o)."""
  q, k, v, weight = (np.asarray(a, np.float64) for a in (q, k, v, weight))
  scale = 1.0 / np.sqrt(q.shape[-1])
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  do = weight
  dv = np.einsum("bhqk,bqhd->bkhd", p, do)
  dp = np.einsum("bqhd,bkhd->bhqk", do, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  return o, (dq, dk, dv)


@pytest.mark.parametrize("batch,queries,keys,heads,dim", [
    (2, 64, 100, 2, 9),     # keys padded to 128 and masked; head dim padded to 16
    (1, 1088, 256, 1, 16),  # 34 backward blocks in 2 runs of 17: the partial dK/dV sums
    (1, 48, 7, 3, 20),      # fewer keys than a tile; queries a multiple of 16, not 32
])
def test_values_and_gradients_match_float64_reference(batch, queries, keys, heads, dim):
  rng = np.random.default_rng(queries + keys)
  q, k, v, weight = (rng.standard_normal(s).astype(np.float32) for s in (
      (batch, queries, heads, dim), (batch, keys, heads, dim), (batch, keys, heads, dim),
      (batch, queries, heads, dim)))
  q *= 2.0  # peaked softmax: a mistake in the max or the mask would show
  want, want_grads = _reference(q, k, v, weight)
  got = fused_attention.fused_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())
  grads = jax.grad(lambda *a: jnp.sum(weight * fused_attention.fused_attention(*a)),
                   argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, want_grads):
    assert g.shape == w.shape and g.dtype == np.float32, name
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5 * np.abs(w).max(),
                               err_msg=f"d{name}")


@pytest.mark.parametrize("tuning", [
    fused_attention.Tuning(forward_tile=16 * 128, backward_tile=16 * 128, forward_warps=4,
                           backward_warps=4, max_runs=64),
    fused_attention.Tuning(forward_tile=128 * 128, backward_tile=64 * 128, max_runs=1),
    fused_attention.Tuning(backward="key_major", backward_tile=16 * 128, max_runs=4),
    fused_attention.Tuning(backward="split", backward_tile=16 * 128, max_runs=4),
])
def test_launch_parameters_do_not_change_the_function(tuning):
  """Other blocks, warps, runs and backward kernels (16 queries a block: 16
  runs of 1 block, or 4 runs of 4; 64 a block: one run of 4): same values
  and gradients as the reference."""
  rng = np.random.default_rng(3)
  q, k, v, weight = (rng.standard_normal(s).astype(np.float32) for s in (
      (1, 256, 2, 9), (1, 100, 2, 9), (1, 100, 2, 9), (1, 256, 2, 9)))
  want, want_grads = _reference(2.0 * q, k, v, weight)
  fn = lambda *a: fused_attention.fused_attention(*a, tuning=tuning)
  np.testing.assert_allclose(np.asarray(fn(2.0 * q, k, v)), want, rtol=0,
                             atol=2e-5 * np.abs(want).max())
  grads = jax.grad(lambda *a: jnp.sum(weight * fn(*a)), argnums=(0, 1, 2))(2.0 * q, k, v)
  for name, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5 * np.abs(w).max(),
                               err_msg=f"d{name}")


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
             for s in ((2, 32, 2, 9), (2, 16, 2, 9), (2, 16, 2, 9)))
  want, _ = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       np.zeros((2, 32, 2, 9)))
  got = fused_attention.fused_attention(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02 * np.abs(want).max())


def test_unknown_backward_is_refused():
  with pytest.raises(ValueError, match="Tuning.backward 'fast'"):
    fused_attention.Tuning(backward="fast")


def test_shapes_it_does_not_take_are_refused():
  assert fused_attention.supported((1, 64, 4, 9), (1, 256, 4, 9))
  assert not fused_attention.supported((1, 64, 4, 9), (1, 257, 4, 9))  # keys > 256
  assert not fused_attention.supported((1, 40, 4, 9), (1, 16, 4, 9))   # 40 % 16
  assert not fused_attention.supported((1, 64, 1, 129), (1, 16, 1, 129))
  with pytest.raises(ValueError, match="256 keys"):
    fused_attention.fused_attention(jnp.zeros((1, 40, 1, 8)), jnp.zeros((1, 8, 1, 8)),
                                    jnp.zeros((1, 8, 1, 8)))


def test_sst_block_computes_the_same_function_with_pallas_as_with_xla():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 16, 16, 8)), jnp.float32)
  blocks = {impl: attention.SSTBlock(num_heads=2, kv_grid=4, implementation=impl, chunks=2)
            for impl in ("xla", "pallas")}
  params = blocks["xla"].init(jax.random.key(0), x)
  # the output projection starts at zero (block = identity): make it count
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 if "proj" in jax.tree_util.keystr(path) else p, params)
  jaxpr = str(jax.make_jaxpr(lambda p: blocks["pallas"].apply(p, x))(params))
  assert "pallas_call" in jaxpr  # the kernel runs (not a silent fallback to XLA)
  assert "pallas_call" not in str(jax.make_jaxpr(lambda p: blocks["xla"].apply(p, x))(params))
  outs, grads = {}, {}
  for impl, block in blocks.items():
    loss = lambda p, b=block: jnp.sum(jnp.sin(b.apply(p, x)))
    outs[impl] = block.apply(params, x)
    grads[impl] = jax.grad(loss)(params)
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads["pallas"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


def test_temporal_stream_through_the_fused_kernel_on_request():
  """temporal_implementation="pallas" (16 slices: queries a multiple of 16):
  the temporal stream runs the kernel, the spatial one XLA's, same function."""
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 16, 4, 4, 8)), jnp.float32)
  blocks = {impl: attention.SSTBlock(num_heads=2, kv_grid=4, implementation="xla",
                                     temporal_implementation=impl, chunks=2)
            for impl in ("auto", "pallas")}
  params = blocks["auto"].init(jax.random.key(0), x)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 if "proj" in jax.tree_util.keystr(path) else p, params)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda p: blocks[impl].apply(p, x))(params))
  assert "pallas_call" in jaxpr("pallas") and "pallas_call" not in jaxpr("auto")
  outs = {impl: b.apply(params, x) for impl, b in blocks.items()}
  np.testing.assert_allclose(outs["pallas"], outs["auto"], atol=1e-5)
  grads = {impl: jax.grad(lambda p, b=b: jnp.sum(jnp.sin(b.apply(p, x))))(params)
           for impl, b in blocks.items()}
  for a, b in zip(jax.tree.leaves(grads["pallas"]), jax.tree.leaves(grads["auto"])):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.parametrize("tuning", [
    fused_attention.DEFAULT_TUNING,
    # the ends of bench/fused_attention_tune.py's sweep: 16- and 128-query
    # blocks, 4 warps, the most runs
    fused_attention.Tuning(forward_tile=4096, backward_tile=4096, forward_warps=4,
                           backward_warps=4, max_runs=256),
    fused_attention.Tuning(forward_tile=32768, backward_tile=16384, max_runs=16),
    fused_attention.Tuning(backward="key_major"),
    fused_attention.Tuning(backward="split"),
])
def test_lowers_to_triton_kernels_for_a_gpu(tuning):
  """Lowered for CUDA without a GPU (an abstract H100): Pallas' Triton
  lowering rejects what the interpreter accepts (tile shapes, ops), so this
  is the check that the kernels compile where they are meant to run."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  q = jax.ShapeDtypeStruct((16, 25600, 4, 9), jnp.bfloat16)  # level 1 of the paper's patch
  k = jax.ShapeDtypeStruct((16, 196, 4, 9), jnp.bfloat16)
  # interpret left to its default: under an abstract GPU mesh, Triton
  loss = lambda q, k, v: jnp.sum(
      fused_attention.fused_attention(q, k, v, tuning=tuning).astype(jnp.float32))
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  # forward and backward kernels, and the split backward's dQ kernel
  assert text.count("__gpu$xla.gpu.triton") == 2 + (tuning.backward == "split")


def test_float32_products_follow_the_default_matmul_precision():
  """On a GPU, Triton's float32 dot is TF32 unless asked otherwise; the kernels
  must ask as jnp's products do, so `jax.default_matmul_precision("highest")`
  gives IEEE float32 in both (the float64-reference tests above need it there)."""
  q, k = jnp.zeros((1, 32, 1, 16)), jnp.zeros((1, 16, 1, 16))
  trace = lambda: str(jax.make_jaxpr(jax.grad(
      lambda q: fused_attention.fused_attention(q, k, k).sum()))(q))
  with jax.default_matmul_precision("default"):  # not JAX_DEFAULT_MATMUL_PRECISION's
    assert trace().count("Precision.HIGHEST") == 0
  with jax.default_matmul_precision("highest"):
    text = trace()
  # the kernels: 2 products forward, 5 backward; and the backward's jnp einsum (delta)
  assert text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 8
