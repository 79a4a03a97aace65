"""The train state: one pytree holding generator and discriminator, their
optimiser states, the EMA of the generator, the step and the RNG. `jax.jit`
shards and donates it whole and Orbax saves and restores it whole, so resume
is exact."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from stt_jax import backend
from stt_jax.errors import UserError
from stt_jax.models.discriminator import Discriminator


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar
  params: Any                # generator parameters (float32)
  opt_state: Any             # Optax state of the generator
  disc_params: Any           # discriminator parameters; {} without the adversarial loss
  disc_opt_state: Any        # Optax state of the discriminator; {} without it
  ema_params: Any            # EMA of the generator parameters; {} when train.ema_decay = 0
  rng: jax.Array             # the run's base key data; step s uses fold_in(rng, s)

  def inference_params(self):
    """The weights to segment with: the EMA where kept, else the live ones."""
    return self.ema_params if self.ema_params else self.params


def make_schedule(train_cfg, learning_rate: float) -> optax.Schedule:
  """Linear warm-up from 0.001x over `warmup_steps`, then `schedule`:
  constant (the original's), cosine or linear decay to 1% by `steps`."""
  warmup = max(int(train_cfg.warmup_steps), 1)
  decay_steps = max(int(train_cfg.steps) - warmup, 1)
  if train_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=0.01)
  elif train_cfg.schedule == "linear":
    after = optax.linear_schedule(learning_rate, learning_rate * 0.01, decay_steps)
  else:
    after = optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(learning_rate * 1e-3, learning_rate, warmup), after],
      [warmup])


def _clip_first(inner: optax.GradientTransformation,
                max_norm: float) -> optax.GradientTransformation:
  """`inner` applied to the gradients scaled to global norm <= max_norm.
  Clipping keeps no state, so the optimiser state is `inner`'s alone: a run
  can be resumed with clipping switched on (a run whose loss spiked, from the
  checkpoint before the spike) or off."""
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    updates, _ = clip.update(updates, optax.EmptyState())
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update)


def _decay_mask(exempt: tuple[str, ...]):
  """The weights (ndim > 1) the L2 applies to, leaving out every top-level
  module whose name starts with one of `exempt`. Adam divides the summed
  gradient by its own scale, so where the task gradient of a weight is far
  below weight_decay * w (a fresh branch behind a zero-initialised projection)
  the L2 alone steers it: it shrinks by about the learning rate every step,
  whatever weight_decay is (docs/architecture.md, "Coupled L2 and fresh blocks")."""

  def mask(params):
    if exempt:
      names = sorted(params)
      unmatched = [e for e in exempt if not any(n.startswith(e) for n in names)]
      if unmatched:
        raise UserError(f"train.weight_decay_exempt: {unmatched[0]!r} starts the name of "
                        f"no module of this model; its modules: {', '.join(names)}")
    return {name: jax.tree.map(lambda p, name=name: p.ndim > 1 and not name.startswith(exempt),
                               tree) for name, tree in params.items()}

  return mask


def _adam(train_cfg, learning_rate: float,
          decay_exempt: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Adam with optional global-norm clipping and the original's coupled L2.

  Clipping sees the raw gradients; the original Res-UNET-R then adds
  weight_decay * w to the gradients of weights (not biases) before Adam;
  `decay_exempt` names modules it leaves out.
  """
  parts = []
  if train_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(train_cfg.weight_decay,
                                           mask=_decay_mask(tuple(decay_exempt))))
  parts.append(optax.adam(make_schedule(train_cfg, learning_rate), b1=0.9, b2=0.999))
  optimizer = optax.chain(*parts)
  if train_cfg.grad_clip_norm > 0:
    optimizer = _clip_first(optimizer, float(train_cfg.grad_clip_norm))
  return optimizer


def check_decay_exempt(model, patch_shape, train_cfg) -> None:
  """UserError where train.weight_decay_exempt names no module of `model`;
  traced only (no arrays), so a run can refuse before it touches its folder."""
  exempt = tuple(train_cfg.get("weight_decay_exempt", ()))
  if exempt and train_cfg.weight_decay > 0:
    _decay_mask(exempt)(jax.eval_shape(lambda: init_params(model, patch_shape, 0)))


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Optimiser of the generator."""
  return _adam(train_cfg, train_cfg.learning_rate,
               tuple(train_cfg.get("weight_decay_exempt", ())))


def make_disc_optimizer(train_cfg) -> optax.GradientTransformation:
  """Optimiser of the discriminator (own learning rate, same schedule)."""
  return _adam(train_cfg, train_cfg.disc_learning_rate)


def make_discriminator(model_cfg) -> Discriminator:
  return Discriminator(features=tuple(model_cfg.discriminator.features),
                       impl=model_cfg.conv_impl, dtype=backend.compute_dtype(model_cfg.compute_dtype))


def init_params(model, patch_shape, seed: int):
  """Generator parameters alone (jitted: eager orthogonal init is slow)."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  dummy = jnp.zeros((1, *patch_shape, 1), jnp.float32)
  return jax.jit(model.init)(init_key, dummy)["params"]


def create(model, optimizer: optax.GradientTransformation, patch_shape, seed: int, *,
           discriminator: Discriminator | None = None,
           disc_optimizer: optax.GradientTransformation | None = None,
           ema: bool = False) -> TrainState:
  """A fresh state. The discriminator parts are empty without `discriminator`."""
  init_key, state_key = jax.random.split(jax.random.key(seed))
  params = init_params(model, patch_shape, seed)
  disc_params, disc_opt_state = {}, {}
  if discriminator is not None:
    dummy = jnp.zeros((1, *patch_shape, 1), jnp.float32)
    disc_params = jax.jit(discriminator.init)(jax.random.fold_in(init_key, 1),
                                              dummy, dummy)["params"]
    disc_opt_state = disc_optimizer.init(disc_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    disc_params=disc_params, disc_opt_state=disc_opt_state,
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                    rng=jax.random.key_data(state_key))
