import jax
import numpy as np
import pytest

from stt_jax.config import default_config
from stt_jax.train import loop, step as step_lib


def _cfg(adversarial=0.0, ema=0.0, model_parallel=1):
  c = default_config()
  # three levels: what these tests check (sharding, donation, masking, dtypes)
  # does not depend on depth, and compiling is most of their time
  c.model.widths = (4, 6, 8)
  c.model.downsample_z = c.model.downsample_z[:2]
  c.model.discriminator.features = (4, 8)
  c.data.patch_shape = (4, 32, 32)
  c.train.batch_size = 2
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 1
  c.train.ema_decay = ema
  c.train.model_parallel = model_parallel
  c.loss.adversarial_weight = adversarial
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.random((2, 4, 32, 32, 1)).astype(np.float32)
  target = np.stack([image[..., 0] > 0.6, image[..., 0] > 0.9], -1).astype(np.float32)
  return {"image": image, "target": target}


def _run(cfg, devices, steps, keep_initial=False):
  """(state, metrics per step[, the initial state as numpy])."""
  setup = loop.build(cfg, devices)
  fn = setup.jit_step(cfg.loss)
  state, history = setup.state, []
  initial = jax.tree.map(np.asarray, state) if keep_initial else None  # before donation
  for s in range(steps):
    state, metrics = fn(state, step_lib.shard_batch(_batch(s), setup.mesh),
                        jax.random.key_data(jax.random.key(s)))
    history.append({k: float(v) for k, v in metrics.items()})
  return (state, history, initial) if keep_initial else (state, history)


def test_loss_decreases_on_a_fixed_batch():
  cfg = _cfg()
  setup = loop.build(cfg, jax.devices()[:1])
  fn = setup.jit_step(cfg.loss)
  state, losses = setup.state, []
  for s in range(30):
    state, metrics = fn(state, step_lib.shard_batch(_batch(), setup.mesh),
                        jax.random.key_data(jax.random.key(s)))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS)")
def test_one_and_two_devices_agree_with_discriminator_and_ema():
  """Same global batch: the whole state (G, D, both Adam states, EMA) after 3
  steps on 1 device equals that on 2, with the batch split (data parallel)
  and with the parameters split (model parallel)."""
  s1, h1, fresh = _run(_cfg(0.5, 0.9), jax.devices()[:1], 3, keep_initial=True)
  # D and EMA really are trained: D moved from its initial weights, the EMA
  # lags the live weights
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
             zip(jax.tree.leaves(s1.disc_params), jax.tree.leaves(fresh.disc_params))) > 0
  assert max(float(np.max(np.abs(np.asarray(e) - np.asarray(p)))) for e, p in
             zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s1.params))) > 0
  assert s1.inference_params() is s1.ema_params
  assert all(np.isfinite(h["d_loss"]) and np.isfinite(h["adversarial"]) for h in h1)
  for model_parallel in (1, 2):
    s2, h2 = _run(_cfg(0.5, 0.9, model_parallel), jax.devices()[:2], 3)
    for a, b in zip(h1, h2):
      for k in ("loss", "supervised", "adversarial", "d_loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), (model_parallel, k)
    assert int(s1.step) == int(s2.step) == 3
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "ema_params"):
      _assert_trees_close(getattr(s1, part), getattr(s2, part))
  # model parallel: the kernels whose last axis 2 divides really are split
  kernels = [x for x in jax.tree.leaves(s2.params) if x.ndim >= 2 and x.shape[-1] % 2 == 0]
  assert kernels and all(len(x.sharding.device_set) == 2 and
                         x.addressable_shards[0].data.shape[-1] == x.shape[-1] // 2
                         for x in kernels)


def test_bfloat16_compute_keeps_float32_state():
  cfg = _cfg(0.5, 0.9)
  cfg.model.compute_dtype = "bfloat16"
  state, history = _run(cfg, jax.devices()[:1], 2)
  for part in ("params", "opt_state", "disc_params", "disc_opt_state", "ema_params"):
    floats = [x for x in jax.tree.leaves(getattr(state, part))
              if np.issubdtype(x.dtype, np.floating)]
    assert floats and all(x.dtype == np.float32 for x in floats), part
  assert all(np.isfinite(v) for h in history for v in h.values())


def test_targets_where_valid_is_zero_change_nothing():
  """A batch with "valid" (data.unlabelled_id): generator and discriminator
  updates do not depend on the targets of unannotated voxels, and do on the
  others."""
  cfg = _cfg(adversarial=0.5)
  setup = loop.build(cfg, jax.devices()[:1])
  fn = setup.jit_step(cfg.loss)
  batch = _batch(3)
  batch["valid"] = np.ones(batch["image"].shape, np.float32)
  batch["valid"][:, :, :, 16:] = 0.0
  initial = jax.tree.map(np.asarray, setup.state)

  def run(target):
    state = jax.tree.map(jax.numpy.asarray, initial)
    new, metrics = fn(state, step_lib.shard_batch(dict(batch, target=target), setup.mesh),
                      jax.random.key_data(jax.random.key(0)))
    return jax.tree.map(np.asarray, new), {k: float(v) for k, v in metrics.items()}

  base_state, base = run(batch["target"])
  outside = batch["target"].copy()
  outside[:, :, :, 16:] = 1.0 - outside[:, :, :, 16:]
  same_state, same = run(outside)
  assert same == base
  for a, b in zip(jax.tree.leaves(base_state), jax.tree.leaves(same_state)):
    np.testing.assert_array_equal(a, b)
  inside = batch["target"].copy()
  inside[:, :, :, :16] = 1.0 - inside[:, :, :, :16]
  _, changed = run(inside)
  assert changed["bce"] != base["bce"] and changed["d_loss"] != base["d_loss"]
