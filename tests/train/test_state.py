"""The generator's optimiser against a numpy Adam with coupled L2 and
global-norm clipping; clipping leaves the optimiser state's structure alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stt_jax.train import state as state_lib


def _train_cfg(clip):
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, steps=10, schedule="constant",
      weight_decay=1e-2, grad_clip_norm=clip))


def _numpy_adam(params, grads_per_step, cfg):
  """The original's update: clip the raw gradient to global norm, add
  weight_decay * w on weights (ndim > 1), then Adam (eps 1e-8)."""
  schedule = state_lib.make_schedule(cfg, cfg.learning_rate)
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_per_step, 1):
    g = {k: np.array(x, np.float64) for k, x in grads.items()}
    if cfg.grad_clip_norm > 0:
      norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
      g = {k: x * min(1.0, cfg.grad_clip_norm / norm) for k, x in g.items()}
    g = {k: x + cfg.weight_decay * p[k] if x.ndim > 1 else x for k, x in g.items()}
    lr = float(schedule(t - 1))
    for k in p:
      m[k] = 0.9 * m[k] + 0.1 * g[k]
      v2[k] = 0.999 * v2[k] + 0.001 * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - 0.9 ** t), v2[k] / (1 - 0.999 ** t)
      p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
  return p


def test_clipped_adam_matches_numpy_and_keeps_the_state_structure():
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  # gradient norms of ~10, 0.1 and 30 around a clip of 1: clipped, not, clipped
  grads = [{k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()}
           for s in (3.0, 0.03, 9.0)]
  for clip in (0.0, 1.0):
    cfg = _train_cfg(clip)
    optimizer = state_lib.make_optimizer(cfg)
    p, opt_state = params, optimizer.init(params)
    for g in grads:
      updates, opt_state = optimizer.update(g, opt_state, p)
      p = jax.tree.map(lambda a, b: a + b, p, updates)
    expected = _numpy_adam(params, grads, cfg)
    for k in params:
      np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=2e-5, atol=2e-6,
                                 err_msg=f"clip {clip} {k}")
  # clipping changes the result (the check above is not empty) ...
  unclipped = _numpy_adam(params, grads, _train_cfg(0.0))
  assert np.abs(unclipped["kernel"] - expected["kernel"]).max() > 1e-4
  # ... but not the state: a run saved without clipping resumes with it
  structure = lambda c: jax.tree.structure(state_lib.make_optimizer(_train_cfg(c)).init(params))
  assert structure(0.0) == structure(1.0)


def test_weight_decay_exempt_modules_get_adam_without_the_l2():
  """Nested params as Flax makes them: the exempt module's weights follow the
  numpy Adam with weight_decay 0, the others the coupled L2 as before."""
  rng = np.random.default_rng(1)
  params = {name: {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
            for name in ("enc0", "sst_enc1")}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32),
                        params) for _ in range(3)]
  cfg = _train_cfg(0.0)
  cfg.weight_decay_exempt = ("sst",)
  optimizer = state_lib.make_optimizer(cfg)
  p, opt_state = params, optimizer.init(params)
  for g in grads:
    updates, opt_state = optimizer.update(g, opt_state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  no_decay = _train_cfg(0.0)
  no_decay.weight_decay = 0.0
  for name, reference_cfg in (("enc0", _train_cfg(0.0)), ("sst_enc1", no_decay)):
    expected = _numpy_adam(params[name], [g[name] for g in grads], reference_cfg)
    for k in params[name]:
      np.testing.assert_allclose(np.asarray(p[name][k]), expected[k], rtol=2e-5, atol=2e-6,
                                 err_msg=f"{name} {k}")
  # the two references differ: the exemption is visible in the result
  decayed = _numpy_adam(params["sst_enc1"], [g["sst_enc1"] for g in grads], _train_cfg(0.0))
  assert np.abs(decayed["kernel"] - np.asarray(p["sst_enc1"]["kernel"])).max() > 1e-4


def test_coupled_l2_shrinks_a_weight_without_task_gradient_by_the_learning_rate():
  """Why the exemption exists: Adam normalises weight_decay * w, so a weight
  whose task gradient is 0 moves about learning_rate towards 0 each step (a
  little less as it shrinks: Adam's second moment remembers the larger w),
  for weight_decay 1e-2 and the default 1e-4 alike, where the decay's size
  would suggest learning_rate * weight_decay * w (2.5e-8 a step at 1e-4 here)."""
  params = {"sst": {"kernel": jnp.full((2, 2), 0.25, jnp.float32)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  moved = {}
  for weight_decay in (1e-2, 1e-4):
    cfg = _train_cfg(0.0)
    cfg.learning_rate, cfg.weight_decay = 1e-3, weight_decay
    optimizer = state_lib.make_optimizer(cfg)
    p, opt_state = params, optimizer.init(params)
    for _ in range(100):
      updates, opt_state = optimizer.update(zero, opt_state, p)
      p = jax.tree.map(lambda a, b: a + b, p, updates)
    expected = _numpy_adam(params["sst"], [zero["sst"]] * 100, cfg)["kernel"]
    np.testing.assert_allclose(np.asarray(p["sst"]["kernel"]), expected, rtol=1e-4)
    moved[weight_decay] = 0.25 - float(expected[0, 0])
  assert 0.08 < moved[1e-4] < 0.1 and abs(moved[1e-2] - moved[1e-4]) < 1e-3, moved
  cfg.weight_decay_exempt = ("sst",)
  optimizer = state_lib.make_optimizer(cfg)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  assert not np.any(np.asarray(updates["sst"]["kernel"]))


def test_weight_decay_exempt_naming_no_module_is_refused_before_training():
  from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(weight_decay=1e-4, weight_decay_exempt=("ssst",)))
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  model_cfg = config_lib.default_config().model
  model_cfg.widths = (4, 4, 4, 4, 4)
  with pytest.raises(UserError, match="'ssst' starts the name of no module.*enc0"):
    state_lib.check_decay_exempt(unet.from_config(model_cfg), (4, 16, 16), cfg)
  cfg.weight_decay_exempt = ("enc",)
  state_lib.check_decay_exempt(unet.from_config(model_cfg), (4, 16, 16), cfg)
