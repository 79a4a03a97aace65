"""The FG-BG adversarial loss of eq. 4, against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.config import default_config
from stt_jax.models import unet
from stt_jax.train import losses, state as state_lib, step as step_lib

LOGITS_REAL = np.array([2.0, -1.0, 0.5])
LOGITS_FAKE = np.array([-0.5, 1.5, 0.0])


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_discriminator_loss_matches_hand_computation():
  lam1 = 0.7
  d_real = [_sig(x) for x in LOGITS_REAL]
  d_fake = [_sig(x) for x in LOGITS_FAKE]
  value = (np.mean([math.log(d) for d in d_real]) + np.mean([math.log(1 - d) for d in d_fake])
           + lam1 * (np.mean(d_real) - np.mean(d_fake)))
  got = losses.discriminator_loss(jnp.asarray(LOGITS_REAL), jnp.asarray(LOGITS_FAKE),
                                  lambda1=lam1)
  assert float(got) == pytest.approx(-value, rel=1e-6)


@pytest.mark.parametrize("form", ["minimax", "non_saturating"])
def test_generator_loss_matches_hand_computation(form):
  lam1 = 0.3
  d_fake = [_sig(x) for x in LOGITS_FAKE]
  if form == "minimax":
    log_term = np.mean([math.log(1 - d) for d in d_fake])
  else:
    log_term = -np.mean([math.log(d) for d in d_fake])
  expected = log_term - lam1 * np.mean(d_fake)
  got = losses.generator_adversarial_loss(jnp.asarray(LOGITS_FAKE), lambda1=lam1, form=form)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_discriminator_loss_is_stable_for_large_logits():
  got = losses.discriminator_loss(jnp.array([80.0]), jnp.array([-80.0]), lambda1=1.0)
  assert np.isfinite(float(got)) and float(got) == pytest.approx(-1.0, abs=1e-6)


def _tiny(adversarial_weight):
  c = default_config()
  c.model.widths = (4, 4, 6)
  c.model.downsample_z = (False, False)
  c.model.discriminator.features = (4, 4)
  c.loss.adversarial_weight = adversarial_weight
  return c


def test_lambda_zero_gives_the_supervised_gradients():
  cfg = _tiny(0.0)
  model = unet.from_config(cfg.model)
  disc = state_lib.make_discriminator(cfg.model)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((2, 4, 16, 16, 1)), jnp.float32)
  target = jnp.asarray(rng.random((2, 4, 16, 16, 2)) > 0.7, jnp.float32)
  batch = {"image": image, "target": target}
  params = state_lib.init_params(model, (4, 16, 16), seed=0)
  disc_params = disc.init(jax.random.key(1), image, image)["params"]

  with_d = step_lib.generator_loss_fn(model, disc, cfg.loss, batch, disc_params)
  without_d = step_lib.generator_loss_fn(model, None, cfg.loss, batch, None)
  cfg_adv = _tiny(0.5)
  adv = step_lib.generator_loss_fn(model, disc, cfg_adv.loss, batch, disc_params)
  grad = lambda fn: jax.grad(lambda p: fn(p)[0])
  g_with, g_without, g_adv = jax.jit(
      lambda p: (grad(with_d)(p), grad(without_d)(p), grad(adv)(p)))(params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_without))
  gap = lambda u, v: max(float(jnp.max(jnp.abs(a - b)))
                         for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v))) / scale
  # equal up to float reassociation (XLA fuses the two programs differently) ...
  assert gap(g_with, g_without) < 1e-5
  # ... while with lambda > 0 the discriminator does change them
  assert gap(g_adv, g_without) > 1e-3
