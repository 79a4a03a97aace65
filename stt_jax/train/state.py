"""The train state: one pytree that jit shards, donates and Orbax saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar
  params: Any                # generator parameters (float32)
  opt_state: Any             # Optax state of the generator
  rng: jax.Array             # the run's base key data; step s uses fold_in(rng, s)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Adam with the original's coupled L2 decay and linear warm-up.

  The original Res-UNET-R adds weight_decay * w to the gradients of weights
  (not biases) before Adam, warms up linearly from 0.001x over `warmup_steps`,
  then keeps the rate constant (`schedule="constant"`); `"cosine"` decays it
  to 1% by `steps` instead, which helps short runs settle.
  """
  lr = train_cfg.learning_rate
  warmup = max(int(train_cfg.warmup_steps), 1)
  if train_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(int(train_cfg.steps) - warmup, 1),
                                        alpha=0.01)
  else:
    after = optax.constant_schedule(lr)
  schedule = optax.join_schedules(
      [optax.linear_schedule(lr * 1e-3, lr, warmup), after], [warmup])
  weights_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if train_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(train_cfg.weight_decay, mask=weights_only))
  parts.append(optax.adam(schedule, b1=0.9, b2=0.999))
  return optax.chain(*parts)


def create(model, optimizer: optax.GradientTransformation, patch_shape,
           seed: int) -> TrainState:
  """Initialises parameters (jitted: eager orthogonal init is slow) and state."""
  init_key, state_key = jax.random.split(jax.random.key(seed))
  dummy = jnp.zeros((1, *patch_shape, 1), jnp.float32)
  params = jax.jit(model.init)(init_key, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.key_data(state_key))
