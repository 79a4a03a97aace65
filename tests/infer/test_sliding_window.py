import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.infer import sliding_window
from stt_jax.train.step import make_mesh


@pytest.mark.parametrize("size,window,overlap", [(10, 4, 0.5), (64, 16, 0.25),
                                                 (7, 7, 0.5), (5, 8, 0.5), (33, 8, 0.0)])
def test_window_starts_cover_the_axis(size, window, overlap):
  starts = sliding_window.window_starts(size, window, overlap)
  covered = np.zeros(size, bool)
  for s in starts:
    covered[s:s + window] = True
    assert s >= 0 and (s + window <= size or s == 0)
  assert covered.all() and starts == sorted(set(starts))


def test_blending_weights_peak_at_centre():
  w = sliding_window.blending_weights((5, 9, 9))
  assert w.argmax() == np.ravel_multi_index((2, 4, 4), w.shape)
  assert w.min() > 0 and w.max() == pytest.approx(1 + 1e-4)


def test_blended_prediction_of_a_pointwise_map_is_exact(tmp_path):
  # a window-independent prediction must come out unchanged after blending,
  # whatever the windows, overlaps and volume edges
  image = np.random.default_rng(0).integers(0, 256, (9, 40, 37)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = jax.jit(lambda params, x: jnp.concatenate([x, 1 - x], -1) * params)
  probs = sliding_window.predict_volume(fn, jnp.float32(1.0), vol, mesh,
                                        window=(4, 16, 16), overlap=0.5, batch_size=2)
  np.testing.assert_allclose(probs[..., 0], image / 255.0, atol=1e-5)
  np.testing.assert_allclose(probs[..., 1], 1 - image / 255.0, atol=1e-5)


class _CumsumModel:
  """A 'model' that is not flip-invariant: logit(p) of a running mean along
  each axis, so each test-time transform changes the raw output."""

  def apply(self, variables, x):
    y = (jnp.cumsum(x, 1) + jnp.cumsum(x, 2) * 0.5 + jnp.cumsum(x, 3) * 0.25) / 10.0
    p = jnp.clip(jnp.concatenate([y, x], -1) * variables["params"], 1e-4, 1 - 1e-4)
    return jnp.log(p) - jnp.log1p(-p)


@pytest.mark.parametrize("mode", ["flips", "flips_transpose"])
def test_test_time_augmentation_averages_the_inverse_transformed_outputs(mode):
  x = np.random.default_rng(0).random((2, 4, 6, 6, 1)).astype(np.float32)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh, tta=mode)
  got = np.asarray(fn(jnp.float32(0.9), jnp.asarray(x)))

  def raw(v):
    y = (np.cumsum(v, 1) + np.cumsum(v, 2) * 0.5 + np.cumsum(v, 3) * 0.25) / 10.0
    return np.clip(np.concatenate([y, v], -1) * 0.9, 1e-4, 1 - 1e-4)

  outs = []
  for transpose in ((False, True) if mode == "flips_transpose" else (False,)):
    for flips in itertools.product((False, True), repeat=3):
      axes = tuple(a for a, f in zip((1, 2, 3), flips) if f)
      v = np.flip(x, axes) if axes else x
      v = np.swapaxes(v, 2, 3) if transpose else v
      p = raw(v)
      p = np.swapaxes(p, 2, 3) if transpose else p
      outs.append(np.flip(p, axes) if axes else p)
  assert len(outs) == (16 if mode == "flips_transpose" else 8)
  np.testing.assert_allclose(got, np.mean(outs, 0), atol=1e-5)
  assert not np.allclose(got, raw(x), atol=1e-3)


def test_blocks_and_whole_volume_give_the_same_blend(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (10, 45, 38)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  whole = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh, window=(4, 16, 16),
                                        overlap=0.5, batch_size=4)
  for block in ((4, 16, 16), (3, 20, 50)):
    blocked = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh,
                                            window=(4, 16, 16), overlap=0.5, batch_size=4,
                                            block=block)
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
