"""Supervised losses on (mask, contour) logits: weighted BCE and soft Dice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def class_balance_weights(target: jax.Array) -> jax.Array:
  """Per-sample, per-channel weights of the original Res-UNET-R code.

  target [batch, depth, height, width, channels] in {0, 1}. With f the positive
  fraction of a sample's channel, clipped to [0.05, 0.99]: if f <= 0.5
  positives weigh (1 - f) / f and negatives 1, else negatives weigh f / (1 - f)
  and positives 1. A uniform crop (all 0 or all 1) weighs 1 everywhere.
  """
  axes = tuple(range(1, target.ndim - 1))
  raw = jnp.mean(target, axis=axes, keepdims=True)
  f = jnp.clip(raw, 0.05, 0.99)
  pos_w = jnp.where(f <= 0.5, (1 - f) / f, 1.0)
  neg_w = jnp.where(f <= 0.5, 1.0, f / (1 - f))
  weights = jnp.where(target > 0.5, pos_w, neg_w)
  uniform = (raw == 0) | (raw == 1)
  return jnp.where(uniform, 1.0, weights)


def weighted_bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean class-balanced binary cross-entropy over all voxels and channels."""
  weights = jax.lax.stop_gradient(class_balance_weights(target))
  return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, target))


def soft_dice(logits: jax.Array, target: jax.Array, eps: float = 1.0) -> jax.Array:
  """1 - soft Dice per sample and channel, averaged. Shapes as `logits`."""
  prob = jax.nn.sigmoid(logits)
  axes = tuple(range(1, logits.ndim - 1))
  inter = jnp.sum(prob * target, axis=axes)
  total = jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes)
  return jnp.mean(1.0 - (2.0 * inter + eps) / (total + eps))


def supervised_loss(logits: jax.Array, target: jax.Array, *, bce_weight: float,
                    dice_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  bce = weighted_bce(logits, target)
  dice = soft_dice(logits, target)
  total = bce_weight * bce + dice_weight * dice
  return total, {"loss": total, "bce": bce, "dice": dice}
