import numpy as np
import pytest

from stt_jax.metrics.semantic import foreground_scores


def test_counts_worked_by_hand():
  gt = np.zeros((1, 1, 10), bool)
  pred = np.zeros((1, 1, 10), bool)
  gt[..., 0:6] = True      # 6 positives
  pred[..., 3:8] = True    # 3 TP, 2 FP, 3 FN
  s = foreground_scores(gt, pred)
  assert s["jaccard"] == pytest.approx(3 / 8)
  assert s["dice"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 3))
  assert s["precision"] == pytest.approx(3 / 5)
  assert s["recall"] == pytest.approx(3 / 6)


def test_perfect_and_shape_mismatch():
  gt = np.random.default_rng(0).random((3, 5, 5)) > 0.5
  assert foreground_scores(gt, gt)["jaccard"] == 1.0
  with pytest.raises(ValueError):
    foreground_scores(gt, gt[:2])
