import numpy as np
import pytest

from stt_jax.train import losses


def _numpy_weights(target):
  w = np.ones_like(target)
  for b in range(target.shape[0]):
    for c in range(target.shape[-1]):
      t = target[b, ..., c]
      raw = t.mean()
      if raw in (0.0, 1.0):
        continue
      f = min(max(raw, 0.05), 0.99)
      if f <= 0.5:
        w[b, ..., c] = np.where(t > 0.5, (1 - f) / f, 1.0)
      else:
        w[b, ..., c] = np.where(t > 0.5, 1.0, f / (1 - f))
  return w


def test_weighted_bce_matches_numpy():
  rng = np.random.default_rng(0)
  target = np.zeros((3, 2, 8, 8, 2), np.float32)
  target[0, ..., 0] = rng.random((2, 8, 8)) < 0.1    # sparse: f clipped up
  target[0, ..., 1] = rng.random((2, 8, 8)) < 0.8    # dense: negatives weighted
  target[1, ..., 0] = 1.0                            # uniform crops: weight 1
  target[2, ..., 1] = rng.random((2, 8, 8)) < 0.3
  logits = rng.standard_normal(target.shape).astype(np.float32) * 3
  w = _numpy_weights(target)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
  assert float(losses.weighted_bce(logits, target)) == pytest.approx(np.mean(w * bce), rel=1e-5)
  np.testing.assert_allclose(np.asarray(losses.class_balance_weights(target)), w, rtol=1e-6)
  # balance off: the plain mean (weights are not all 1 here, so this can fail)
  assert not np.allclose(w, 1.0)
  assert float(losses.weighted_bce(logits, target, balance=False)) == pytest.approx(
      np.mean(bce), rel=1e-5)
  total, _ = losses.supervised_loss(logits, target, bce_weight=1.0, dice_weight=0.0,
                                    class_balance=False)
  assert float(total) == pytest.approx(np.mean(bce), rel=1e-5)


def test_soft_dice():
  target = np.zeros((1, 1, 2, 2, 1), np.float32)
  target[..., 0, :, 0] = 1
  logits = np.full(target.shape, -50.0, np.float32)
  logits[..., 0, :, 0] = 50.0
  assert float(losses.soft_dice(logits, target)) == pytest.approx(0.0, abs=1e-6)
  # prediction 0.5 everywhere: inter 1, total 2 + 2 -> 1 - (2+1)/(4+1)
  half = np.zeros(target.shape, np.float32)
  assert float(losses.soft_dice(half, target)) == pytest.approx(1 - 3 / 5, rel=1e-6)


def test_distance_channel_adds_its_mean_squared_error():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
  target = np.concatenate([(rng.random((2, 3, 8, 8, 2)) < 0.3),
                           rng.random((2, 3, 8, 8, 1))], -1).astype(np.float32)
  two, m2 = losses.supervised_loss(logits[..., :2], target[..., :2], bce_weight=1.0,
                                   dice_weight=1.0)
  three, m3 = losses.supervised_loss(logits, target, bce_weight=1.0, dice_weight=1.0,
                                     distance_weight=0.5)
  mse = np.mean((1 / (1 + np.exp(-logits[..., 2])) - target[..., 2]) ** 2)
  np.testing.assert_allclose(float(m3["distance"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(three), float(two) + 0.5 * mse, rtol=1e-5)
  assert "distance" not in m2


def test_unannotated_voxels_weigh_nothing():
  """With `valid`, BCE (class weights from annotated voxels), Dice and the
  distance MSE equal numpy over annotated voxels alone, and no gradient
  reaches a logit where valid is 0."""
  import jax
  rng = np.random.default_rng(4)
  shape = (2, 3, 8, 8)
  target = np.concatenate([rng.random((*shape, 2)) < 0.3, rng.random((*shape, 1))],
                          -1).astype(np.float32)
  logits = rng.normal(size=(*shape, 3)).astype(np.float32) * 2
  valid = np.ones((*shape, 1), np.float32)
  valid[0, :, :4] = 0                  # half of sample 0 unannotated
  valid[1, 1:] = 0                     # most of sample 1
  keep = valid[..., 0] > 0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce_sum = weight_sum = 0.0
  dice = []
  for b in range(2):
    for c in range(2):
      t, q = target[b, ..., c][keep[b]], p[b, ..., c][keep[b]]
      raw = t.mean()
      f = min(max(raw, 0.05), 0.99)
      w = (np.ones_like(t) if raw in (0.0, 1.0) else
           np.where(t > 0.5, (1 - f) / f, 1.0) if f <= 0.5 else np.where(t > 0.5, 1.0, f / (1 - f)))
      bce_sum += np.sum(w * -(t * np.log(q) + (1 - t) * np.log(1 - q)))
      weight_sum += t.size
      dice.append(1 - (2 * np.sum(q * t) + 1) / (np.sum(q) + np.sum(t) + 1))
  mse = np.mean((p[..., 2][keep] - target[..., 2][keep]) ** 2)
  total, parts = losses.supervised_loss(logits, target, bce_weight=1.0, dice_weight=1.0,
                                        distance_weight=1.0, valid=valid)
  assert float(parts["bce"]) == pytest.approx(bce_sum / weight_sum, rel=1e-5)
  assert float(parts["dice"]) == pytest.approx(np.mean(dice), rel=1e-5)
  assert float(parts["distance"]) == pytest.approx(mse, rel=1e-5)
  grad = jax.grad(lambda x: losses.supervised_loss(
      x, target, bce_weight=1.0, dice_weight=1.0, valid=valid)[0])(logits)
  assert np.all(np.asarray(grad)[~keep] == 0) and np.abs(np.asarray(grad)[keep]).min() > 0
  # all annotated: the unmasked loss
  everywhere, _ = losses.supervised_loss(logits, target, bce_weight=1.0, dice_weight=1.0,
                                         valid=np.ones_like(valid))
  plain, _ = losses.supervised_loss(logits, target, bce_weight=1.0, dice_weight=1.0)
  assert float(everywhere) == pytest.approx(float(plain), rel=1e-6)
