"""The train step: a pure function of (state, batch, rng), jitted once with
explicit shardings over a device mesh and the state donated.

The mesh has two axes: `data` splits the batch; `model` (size 1 unless
`train.model_parallel` > 1) splits the last axis of every parameter (and of its
Adam moments and EMA) whose size it divides, so that wide models need not be
replicated on each device. XLA's SPMD partitioner inserts the collectives.

Generator and discriminator are updated in the same step (simultaneous
gradient steps): the generator's adversarial gradient uses D as it was at the
start of the step, and D is trained on the prediction of that same forward
pass (detached). Alternating updates would cost a second generator forward
pass per step, or train D on a prediction one step stale; the expensive part
of a step is the generator, so one forward pass serves both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stt_jax.errors import UserError
from stt_jax.train import losses
from stt_jax.train.state import TrainState


def make_mesh(devices=None, model_parallel: int = 1) -> Mesh:
  """[data, model] mesh over `devices` (all devices by default)."""
  devices = list(jax.devices() if devices is None else devices)
  if model_parallel < 1 or len(devices) % model_parallel:
    raise UserError(f"train.model_parallel={model_parallel} must divide the "
                    f"{len(devices)} devices")
  grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, ("data", "model"))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def leaf_sharding(leaf, mesh: Mesh) -> NamedSharding:
  """Last axis on `model` where the model axis divides it; else replicated."""
  m = mesh.shape["model"]
  shape = getattr(leaf, "shape", ())
  if m > 1 and len(shape) >= 2 and shape[-1] % m == 0:
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "model"))
  return NamedSharding(mesh, P())


def state_shardings(state: TrainState, mesh: Mesh):
  return jax.tree.map(lambda leaf: leaf_sharding(leaf, mesh), state)


def generator_loss_fn(model, discriminator, loss_cfg, batch: dict, disc_params):
  """params -> (total generator loss, (metrics, predicted mask)).

  With the adversarial loss: L = L_sup + adversarial_weight * L_fg-bg(G),
  D's parameters held fixed.
  """

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["image"]).astype(jnp.float32)
    supervised, metrics = losses.supervised_loss(
        logits, batch["target"], bce_weight=loss_cfg.bce_weight,
        dice_weight=loss_cfg.dice_weight, distance_weight=loss_cfg.distance_weight,
        class_balance=loss_cfg.class_balance, valid=batch.get("valid"))
    pred_mask = jax.nn.sigmoid(logits[..., :1])
    if "valid" in batch:  # D compares annotated voxels only: both masks 0 elsewhere
      pred_mask = pred_mask * batch["valid"]
    total = supervised
    metrics["supervised"] = supervised
    if discriminator is not None:
      fake = discriminator.apply({"params": disc_params}, batch["image"], pred_mask)
      adversarial = losses.generator_adversarial_loss(
          fake, lambda1=loss_cfg.adversarial_lambda1, form=loss_cfg.adversarial_form)
      total = supervised + loss_cfg.adversarial_weight * adversarial
      metrics["adversarial"] = adversarial
    metrics["loss"] = total
    return total, (metrics, pred_mask)

  return loss_fn


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model, optimizer: optax.GradientTransformation, loss_cfg,
               discriminator=None, disc_optimizer=None, ema_decay: float = 0.0):
  """One update of G (and D). Returns (new_state, scalar metrics).

  batch: image [b, d, h, w, 1], target [b, d, h, w, 2 or 3] (mask, contour
  and, with model.outputs' "distance", the normalised distance), and with
  data.unlabelled_id valid [b, d, h, w, 1] (1 = annotated).
  `rng` (key data from the run's base key and the step) is for stochastic
  layers; the models have none today.
  """
  del rng
  loss_fn = generator_loss_fn(model, discriminator, loss_cfg, batch, state.disc_params)
  (_, (metrics, pred_mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  new = dict(step=state.step + 1, params=params, opt_state=opt_state)

  if discriminator is not None:
    real_mask = batch["target"][..., :1] * batch.get("valid", 1.0)
    fake_mask = jax.lax.stop_gradient(pred_mask)

    def d_loss_fn(disc_params):
      real = discriminator.apply({"params": disc_params}, batch["image"], real_mask)
      fake = discriminator.apply({"params": disc_params}, batch["image"], fake_mask)
      return losses.discriminator_loss(real, fake, lambda1=loss_cfg.adversarial_lambda1)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
    d_updates, disc_opt_state = disc_optimizer.update(d_grads, state.disc_opt_state,
                                                      state.disc_params)
    new.update(disc_params=optax.apply_updates(state.disc_params, d_updates),
               disc_opt_state=disc_opt_state)
    metrics["d_loss"] = d_loss
    metrics["d_grad_norm"] = optax.tree.norm(d_grads)

  if ema_decay > 0:
    new["ema_params"] = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  return state.replace(**new), metrics


def jit_train_step(model, optimizer, loss_cfg, mesh: Mesh, state: TrainState, *,
                   discriminator=None, disc_optimizer=None, ema_decay: float = 0.0):
  """Compiles `train_step` for `mesh`: batch on `data`, state per
  `state_shardings`, the input state donated."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  state_sharding = state_shardings(state, mesh)
  step_fn = functools.partial(train_step, model=model, optimizer=optimizer,
                              loss_cfg=loss_cfg, discriminator=discriminator,
                              disc_optimizer=disc_optimizer, ema_decay=ema_decay)
  return jax.jit(step_fn,
                 in_shardings=(state_sharding, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=0)


def to_host(tree):
  """Replicated (global) arrays -> numpy, also where other processes hold
  some of the devices (jax.device_get refuses those)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host arrays -> global arrays split on `data`.

  Single process: `batch` is the global batch. Several processes: `batch` is
  this process's share (its rows of the global batch, in process order).
  """
  sharding = NamedSharding(mesh, P("data"))
  if jax.process_count() == 1:
    return {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
