"""The train step: a pure function of (state, batch, rng), jitted once with
explicit shardings over a device mesh (batch split on `data`, state
replicated) and the state donated."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stt_jax.train import losses
from stt_jax.train.state import TrainState


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(devices, ("data",))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model, optimizer: optax.GradientTransformation, loss_cfg):
  """One optimiser update. Returns (new_state, metrics) with scalar metrics.

  batch: image [b, d, h, w, 1], target [b, d, h, w, 2]. `rng` (key data,
  derived from the run's base key and the step) is for stochastic layers; the
  baseline has none.
  """
  del rng

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["image"])
    return losses.supervised_loss(logits, batch["target"],
                                  bce_weight=loss_cfg.bce_weight,
                                  dice_weight=loss_cfg.dice_weight)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def jit_train_step(model, optimizer, loss_cfg, mesh: Mesh, state: TrainState):
  """Compiles `train_step` for `mesh`: batch on `data`, state replicated."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, state)
  step_fn = functools.partial(train_step, model=model, optimizer=optimizer,
                              loss_cfg=loss_cfg)
  return jax.jit(step_fn,
                 in_shardings=(state_sharding, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=0)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()}
