import jax
import ml_collections
import numpy as np
import pytest

from stt_jax.config import default_config
from stt_jax.train import loop, step as step_lib


def _cfg():
  c = default_config()
  c.model.widths = (4, 4, 6, 6, 8)
  c.data.patch_shape = (4, 32, 32)
  c.train.batch_size = 2
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 1
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.random((2, 4, 32, 32, 1)).astype(np.float32)
  target = np.stack([image[..., 0] > 0.6, image[..., 0] > 0.9], -1).astype(np.float32)
  return {"image": image, "target": target}


def _run(cfg, devices, steps):
  model, optimizer, state, _ = loop.build(cfg)
  mesh = step_lib.make_mesh(devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  fn = step_lib.jit_train_step(model, optimizer, cfg.loss, mesh, state)
  losses = []
  for s in range(steps):
    state, metrics = fn(state, step_lib.shard_batch(_batch(), mesh),
                        jax.random.key_data(jax.random.key(s)))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_loss_decreases_on_a_fixed_batch():
  state, losses = _run(_cfg(), jax.devices()[:1], 30)
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS)")
def test_one_and_two_devices_agree():
  s1, l1 = _run(_cfg(), jax.devices()[:1], 3)
  s2, l2 = _run(_cfg(), jax.devices()[:2], 3)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
