"""Supervised losses: weighted BCE and soft Dice on the (mask, contour)
logits; mean squared error of the optional normalised-distance channel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def class_balance_weights(target: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Per-sample, per-channel weights of the original Res-UNET-R code.

  target [batch, depth, height, width, channels] in {0, 1}. With f the positive
  fraction of a sample's channel, clipped to [0.05, 0.99]: if f <= 0.5
  positives weigh (1 - f) / f and negatives 1, else negatives weigh f / (1 - f)
  and positives 1. A uniform crop (all 0 or all 1) weighs 1 everywhere.
  With `valid` [batch, depth, height, width, 1] (1 = annotated), f counts
  annotated voxels only.
  """
  axes = tuple(range(1, target.ndim - 1))
  if valid is None:
    raw = jnp.mean(target, axis=axes, keepdims=True)
  else:
    raw = (jnp.sum(target * valid, axis=axes, keepdims=True)
           / jnp.maximum(jnp.sum(valid, axis=axes, keepdims=True), 1.0))
  f = jnp.clip(raw, 0.05, 0.99)
  pos_w = jnp.where(f <= 0.5, (1 - f) / f, 1.0)
  neg_w = jnp.where(f <= 0.5, 1.0, f / (1 - f))
  weights = jnp.where(target > 0.5, pos_w, neg_w)
  uniform = (raw == 0) | (raw == 1)
  return jnp.where(uniform, 1.0, weights)


def _valid_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Mean over all entries, or over annotated voxels (each channel)."""
  if valid is None:
    return jnp.mean(values)
  weight = jnp.broadcast_to(valid, values.shape)
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def weighted_bce(logits: jax.Array, target: jax.Array, balance: bool = True,
                 valid: jax.Array | None = None) -> jax.Array:
  """Mean binary cross-entropy over all voxels and channels (annotated ones
  with `valid`), class-balanced per sample and channel
  (`class_balance_weights`) unless `balance` is off."""
  bce = optax.sigmoid_binary_cross_entropy(logits, target)
  if balance:
    bce = jax.lax.stop_gradient(class_balance_weights(target, valid)) * bce
  return _valid_mean(bce, valid)


def soft_dice(logits: jax.Array, target: jax.Array, eps: float = 1.0,
              valid: jax.Array | None = None) -> jax.Array:
  """1 - soft Dice per sample and channel, averaged. Shapes as `logits`;
  with `valid`, over annotated voxels only."""
  prob = jax.nn.sigmoid(logits)
  if valid is not None:
    prob, target = prob * valid, target * valid
  axes = tuple(range(1, logits.ndim - 1))
  inter = jnp.sum(prob * target, axis=axes)
  total = jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes)
  return jnp.mean(1.0 - (2.0 * inter + eps) / (total + eps))


def supervised_loss(logits: jax.Array, target: jax.Array, *, bce_weight: float,
                    dice_weight: float, distance_weight: float = 1.0,
                    class_balance: bool = True, valid: jax.Array | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits, target [batch, depth, height, width, 2 or 3]: channels 0-1 are
  binary (mask, contour); a third is the normalised distance in [0, 1],
  regressed through a sigmoid (PyTC regresses its distance targets with MSE).
  class_balance: the original's per-sample class weights in the BCE (its
  probabilities then over-cover at 0.5; off, they estimate the posterior).
  valid [batch, depth, height, width, 1]: 1 where annotated
  (`data.unlabelled_id`); every term then ignores the other voxels."""
  bce = weighted_bce(logits[..., :2], target[..., :2], balance=class_balance, valid=valid)
  dice = soft_dice(logits[..., :2], target[..., :2], valid=valid)
  total = bce_weight * bce + dice_weight * dice
  metrics = {"bce": bce, "dice": dice}
  if logits.shape[-1] == 3:
    distance = _valid_mean(jnp.square(jax.nn.sigmoid(logits[..., 2:]) - target[..., 2:]),
                           valid)
    total = total + distance_weight * distance
    metrics["distance"] = distance
  return total, {"loss": total, **metrics}


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                       lambda1: float) -> jax.Array:
  """-V of the paper's eq. 4, which D maximises; D(F) = sigmoid(logit).

  V = E[log D(F_gt)] + E[log(1 - D(F_pred))] + lambda1 * E[D(F_gt) - D(F_pred)],
  expectations over the batch and the discriminator's regions.
  """
  real_logits = real_logits.astype(jnp.float32)
  fake_logits = fake_logits.astype(jnp.float32)
  value = (jnp.mean(jax.nn.log_sigmoid(real_logits))
           + jnp.mean(jax.nn.log_sigmoid(-fake_logits))
           + lambda1 * (jnp.mean(jax.nn.sigmoid(real_logits))
                        - jnp.mean(jax.nn.sigmoid(fake_logits))))
  return -value


def generator_adversarial_loss(fake_logits: jax.Array, *, lambda1: float,
                               form: str = "non_saturating") -> jax.Array:
  """The terms of eq. 4 that depend on the generator, which it minimises.

  "minimax": E[log(1 - D(F_pred))] - lambda1 * E[D(F_pred)], eq. 4 as
  written. "non_saturating": -E[log D(F_pred)] - lambda1 * E[D(F_pred)], the
  same fixed point with useful gradients while D still wins easily (the
  practice of the paper's ref. [8], pix2pix).
  """
  fake_logits = fake_logits.astype(jnp.float32)
  if form == "minimax":
    log_term = jnp.mean(jax.nn.log_sigmoid(-fake_logits))
  elif form == "non_saturating":
    log_term = -jnp.mean(jax.nn.log_sigmoid(fake_logits))
  else:
    raise ValueError(f"unknown adversarial form {form!r}")
  return log_term - lambda1 * jnp.mean(jax.nn.sigmoid(fake_logits))
