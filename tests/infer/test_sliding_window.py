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
