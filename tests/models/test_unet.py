import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from stt_jax.models.unet import ResUNet, input_multiple


@pytest.mark.parametrize("downsample_z,shape", [((False,) * 4, (1, 3, 32, 48, 1)),
                                               ((True, False, False, False), (2, 4, 16, 16, 1))])
def test_output_shapes(downsample_z, shape):
  # (an eager-vs-jit comparison lived here: 15-25 s of op-by-op dispatch per
  # case for a check of JAX rather than of the model; cut for the suite's time)
  model = ResUNet(widths=(4, 6, 8, 8, 10), downsample_z=downsample_z)
  x = jax.random.uniform(jax.random.key(0), shape)
  params = jax.jit(model.init)(jax.random.key(1), x)
  out = jax.jit(model.apply)(params, x)
  assert out.shape == shape[:-1] + (2,) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_conv_implementations_agree():
  x = jax.random.uniform(jax.random.key(0), (1, 4, 32, 32, 1))
  native = ResUNet(widths=(4, 4, 6, 6, 8), conv_impl="native")
  params = jax.jit(native.init)(jax.random.key(1), x)
  want = np.asarray(jax.jit(native.apply)(params, x))
  for impl in ("depth_as_batch", "im2col"):
    other = ResUNet(widths=(4, 4, 6, 6, 8), conv_impl=impl)
    np.testing.assert_allclose(np.asarray(jax.jit(other.apply)(params, x)), want,
                               rtol=1e-4, atol=1e-5, err_msg=impl)


def test_forward_only_takes_the_taps_as_outputs_form_at_every_width():
  """Inference (forward_only, as sliding_window's predict function builds it)
  runs every 3x3x3 conv of a 20-24-wide net as taps as outputs, and the
  2-output head's rows; training only the 3x3x3 convs up to 16 wide (none
  here): the same function."""
  x = jax.random.uniform(jax.random.key(0), (1, 4, 32, 32, 1))
  model = ResUNet(widths=(20, 20, 24, 24, 24))
  params = jax.jit(model.init)(jax.random.key(1), x)
  forward = model.clone(forward_only=True)
  count = lambda m: str(jax.make_jaxpr(m.apply)(params, x)).count("custom_vjp_call")
  assert count(model) == 0
  assert count(forward) == 1 + 2 * 9         # the head and both 3x3x3 convs of the 9 blocks
  np.testing.assert_allclose(np.asarray(jax.jit(forward.apply)(params, x)),
                             np.asarray(jax.jit(model.apply)(params, x)), rtol=1e-4, atol=1e-5)


def test_z_is_local_without_z_downsampling():
  # no z down-sampling: a change in slice 0 cannot reach far slices beyond the
  # receptive field in z (each 3x3x3 conv adds 1)
  model = ResUNet(widths=(4, 4, 4, 4, 4))
  x = jax.random.uniform(jax.random.key(0), (1, 40, 16, 16, 1))
  params = jax.jit(model.init)(jax.random.key(1), x)
  apply = jax.jit(model.apply)
  y0 = apply(params, x)
  y1 = apply(params, x.at[:, 0].set(0.0))
  changed = np.abs(np.asarray(y1 - y0)).max(axis=(0, 2, 3, 4)) > 0
  assert changed[0] and not changed[-1]


def test_input_multiple():
  assert input_multiple((False,) * 4) == (1, 16, 16)
  assert input_multiple((True, True, False, False)) == (4, 16, 16)


def _count(params):
  return sum(np.size(v) for v in jax.tree.leaves(params))


def test_attention_none_is_the_baseline_parameter_for_parameter():
  x = jnp.zeros((1, 4, 32, 32, 1))
  base = ResUNet(widths=(4, 4, 6, 6, 8))
  none = ResUNet(widths=(4, 4, 6, 6, 8), attention_design="none", attention_fusion="concat")
  p_base = base.init(jax.random.key(0), x)
  p_none = none.init(jax.random.key(0), x)
  assert jax.tree.structure(p_base) == jax.tree.structure(p_none)
  assert _count(p_base) == _count(p_none)


@pytest.mark.parametrize("design,fusion,everywhere", [
    ("split", "deform", True), ("split", "add", False), ("split", "concat", False),
    ("spatial_then_temporal", "deform", False), ("temporal_then_spatial", "deform", False)])
def test_stt_unet_shapes_jit_and_fresh_blocks_keep_the_baseline_function(design, fusion,
                                                                         everywhere):
  # odd depth, non-square slices; the paper's design with SST at all its
  # stages (encoder 1-4, decoder 3-1), the ablations at one encoder and one
  # decoder stage
  x = jax.random.uniform(jax.random.key(0), (1, 5, 16, 32, 1))
  kw = dict(widths=(4, 4, 6, 6, 8))
  enc, dec = ((1, 2, 3, 4), (3, 2, 1)) if everywhere else ((2,), (1,))
  stt = ResUNet(attention_design=design, attention_fusion=fusion, attention_heads=2,
                attention_kv_grid=4, attention_encoder_levels=enc,
                attention_decoder_levels=dec, deform_groups=2, **kw)
  params = jax.jit(stt.init)(jax.random.key(1), x)
  names = {k for k in params["params"] if k.startswith("sst_")}
  assert names == {f"sst_enc{l}" for l in enc} | {f"sst_dec{l}" for l in dec}
  out = jax.jit(stt.apply)(params, x)
  assert out.shape == (1, 5, 16, 32, 2)
  base_params = {"params": {k: v for k, v in params["params"].items()
                            if not k.startswith("sst_")}}
  base = jax.jit(ResUNet(**kw).apply)(base_params, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-5, atol=1e-6)
  if everywhere:  # the zero-initialised projections are what training moves first
    loss = lambda p: jnp.sum(stt.apply(p, x) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    for name in names:
      assert np.abs(np.asarray(grads["params"][name]["proj"]["kernel"])).max() > 0, name


def test_group_norm_follows_every_conv_but_the_head():
  x = jax.random.uniform(jax.random.key(0), (1, 3, 32, 32, 1))
  kw = dict(widths=(4, 4, 8, 8, 8))
  # shapes only for "none"; one compile gives the group net's params and output
  p_none = jax.eval_shape(ResUNet(**kw).init, jax.random.key(1), x)
  model = ResUNet(norm="group", norm_groups=2, **kw)
  out, params = jax.jit(model.init_with_output)(jax.random.key(1), x)
  leaves = [(tuple(k.key for k in path), v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)]
  convs = {path[:-1] for path, _ in leaves if path[-1] == "kernel"}
  norms = {path[:-2] for path, _ in leaves if path[-2].endswith("_norm")}
  # every conv but the head has one norm beside it, named after it
  assert norms == {conv[:-1] + (conv[-1] + "_norm",) for conv in convs
                   if conv != ("params", "head")}
  # and 'none' is the same network without them
  assert _count(p_none) == sum(np.size(v) for path, v in leaves
                               if not path[-2].endswith("_norm"))
  assert out.shape == (1, 3, 32, 32, 2) and np.all(np.isfinite(np.asarray(out)))


def test_exports_made_before_later_model_keys_build_the_network_they_held(tmp_path):
  """An export whose config predates model.outputs, model.norm(_groups),
  model.attention.chunks, deform_gradient and temporal_implementation:
  two outputs, no norm, one chunk, the gradient's scatter as sampled, the
  temporal stream as before; the keys it has are kept. One of sessions
  34-35, with deform_sorted_gradient, gets the order that bool named."""
  import json  # pylint: disable=g-import-not-at-top
  from stt_jax.config import default_config  # pylint: disable=g-import-not-at-top
  from stt_jax.models.unet import from_config  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  old = json.loads(default_config().model.to_json())
  del old["norm"], old["norm_groups"], old["outputs"], old["attention"]["chunks"]
  del old["attention"]["deform_gradient"], old["attention"]["temporal_implementation"]
  old["widths"], old["attention"]["heads"] = [4, 4, 6, 6, 8], 2
  (tmp_path / checkpoint.EXPORT_MARKER).write_text(json.dumps({"model": old}))
  model = from_config(ml_collections.ConfigDict(
      checkpoint.read_export_model_config(str(tmp_path))))
  assert (model.norm, model.norm_groups, model.out_channels, model.attention_chunks,
          model.widths, model.attention_heads) == ("none", 4, 2, 1, (4, 4, 6, 6, 8), 2)
  assert (model.deform_gradient, model.attention_temporal_impl) == ("scatter", "auto")
  for sort, order in ((True, "sorted"), (False, "scatter")):
    old["attention"]["deform_sorted_gradient"] = sort
    (tmp_path / checkpoint.EXPORT_MARKER).write_text(json.dumps({"model": old}))
    model = from_config(ml_collections.ConfigDict(
        checkpoint.read_export_model_config(str(tmp_path))))
    assert model.deform_gradient == order


def test_denoiser_sits_in_front():
  x = jax.random.uniform(jax.random.key(0), (1, 4, 32, 32, 1))
  model = ResUNet(widths=(4, 4, 6, 6, 8), denoise=True, denoise_kernel=3)
  params = jax.jit(model.init)(jax.random.key(1), x)
  assert "denoise" in params["params"]
  assert jax.jit(model.apply)(params, x).shape == (1, 4, 32, 32, 2)
