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


def _mcc_reference(gt, pred):
  # the textbook formula on float counts
  g, p = gt.ravel().astype(float), pred.ravel().astype(float)
  tp, tn = (g * p).sum(), ((1 - g) * (1 - p)).sum()
  fp, fn = ((1 - g) * p).sum(), (g * (1 - p)).sum()
  return (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def test_blockwise_counts_equal_one_pass_and_mcc_formula():
  from stt_jax.metrics.semantic import ConfusionCounter
  rng = np.random.default_rng(1)
  gt = rng.random((6, 20, 20)) > 0.7
  pred = gt ^ (rng.random(gt.shape) > 0.9)
  counter = ConfusionCounter()
  for z in range(0, 6, 4):
    counter.add(gt[z:z + 4], pred[z:z + 4])
  s = counter.scores()
  assert s == pytest.approx(foreground_scores(gt, pred))
  assert s["mcc"] == pytest.approx(_mcc_reference(gt, pred))
  assert s["f1"] == pytest.approx(s["dice"])
  assert counter.tp + counter.fp + counter.fn + counter.tn == gt.size


def test_threshold_sweep_equals_thresholding_each_level_blockwise():
  from stt_jax.metrics.semantic import SWEEP_THRESHOLDS, ThresholdSweep
  rng = np.random.default_rng(0)
  gt = rng.random((6, 20, 30)) < 0.2
  mask = np.clip(rng.normal(100 + 90 * gt, 60), 0, 255).astype(np.uint8)
  sweep = ThresholdSweep()
  for z in range(0, 6, 4):  # two uneven blocks
    sweep.add(gt[z:z + 4], mask[z:z + 4])
  table = sweep.scores(SWEEP_THRESHOLDS)
  assert list(table) == [f"{t:.2f}" for t in SWEEP_THRESHOLDS]
  for t in SWEEP_THRESHOLDS:
    pred = mask / 255.0 > t  # probability > t, as the decoder reads it
    tp = np.sum(gt & pred)
    union = np.sum(gt | pred)
    assert table[f"{t:.2f}"]["jaccard"] == pytest.approx(tp / union, abs=1e-12)
    assert table[f"{t:.2f}"]["dice"] == pytest.approx(2 * tp / (gt.sum() + pred.sum()),
                                                      abs=1e-12)
    assert table[f"{t:.2f}"]["precision"] == pytest.approx(tp / pred.sum(), abs=1e-12)
    assert table[f"{t:.2f}"]["recall"] == pytest.approx(tp / gt.sum(), abs=1e-12)
  with pytest.raises(ValueError, match="uint8"):
    sweep.add(gt, mask.astype(np.float32))
