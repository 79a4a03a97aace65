"""Instance AP against hand-worked values and a brute-force dense reference."""

import numpy as np
import pytest

from stt_jax.metrics.instance_ap import average_precision

HALF = 51 / 101  # precision 1 at the 51 recall points 0.00..0.50, 0 after


def _line(segments: dict[int, tuple[int, int]], length: int = 1000) -> np.ndarray:
  """A [1, 1, length] label volume with id i on [start, stop)."""
  vol = np.zeros((1, 1, length), np.uint32)
  for i, (start, stop) in segments.items():
    vol[0, 0, start:stop] = i
  return vol


def _brute_force_ap(gt, pred, threshold, min_gt_size=0):
  """Dense IoU matrix and a direct transcription of the COCO matching rule."""
  g_ids = [i for i in np.unique(gt) if i]
  p_ids = [i for i in np.unique(pred) if i]
  g_size = {i: np.sum(gt == i) for i in g_ids}
  p_size = {i: np.sum(pred == i) for i in p_ids}
  p_ids.sort(key=lambda i: (-p_size[i], i))
  ignored = {i: g_size[i] < min_gt_size for i in g_ids}
  g_ids.sort(key=lambda i: (ignored[i], i))
  iou = np.zeros((len(p_ids), len(g_ids)))
  for a, p in enumerate(p_ids):
    for b, g in enumerate(g_ids):
      inter = np.sum((pred == p) & (gt == g))
      iou[a, b] = inter / (p_size[p] + g_size[g] - inter)
  taken = set()
  tp, fp = [], []
  for a in range(len(p_ids)):
    best, match = min(threshold, 1 - 1e-10), None
    for b, g in enumerate(g_ids):
      if b in taken:
        continue
      if match is not None and not ignored[g_ids[match]] and ignored[g]:
        break
      if iou[a, b] < best:
        continue
      best, match = iou[a, b], b
    if match is not None:
      taken.add(match)
      if ignored[g_ids[match]]:
        continue
      tp.append(1); fp.append(0)
    else:
      tp.append(0); fp.append(1)
  n_gt = sum(not ignored[g] for g in g_ids)
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  recall = tp / n_gt
  precision = tp / np.maximum(tp + fp, 1e-12)
  for k in range(len(precision) - 2, -1, -1):
    precision[k] = max(precision[k], precision[k + 1])
  total = 0.0
  for r in np.linspace(0, 1, 101):
    hits = [k for k in range(len(recall)) if recall[k] >= r]
    total += precision[hits[0]] if hits else 0.0
  return total / 101


def test_perfect_prediction_is_one():
  gt = _line({1: (0, 100), 2: (200, 300), 3: (400, 450)})
  relabelled = np.where(gt > 0, gt + 10, 0)
  result = average_precision(gt, relabelled)
  assert result["ap_50"] == 1.0 and result["ap_75"] == 1.0 and result["ap"] == 1.0


def test_split_instance():
  # B (100 voxels) split into 60 + 40: IoU 0.6 and 0.4.
  gt = _line({1: (0, 100), 2: (200, 300)})
  pred = _line({1: (0, 100), 2: (200, 260), 3: (260, 300)})
  result = average_precision(gt, pred)
  # t=0.5: ranks A(TP) B1(TP) B2(FP): recall reaches 1 at precision 1.
  assert result["ap_50"] == pytest.approx(1.0)
  # t=0.75: A(TP) then two FPs: recall stops at 0.5.
  assert result["ap_75"] == pytest.approx(HALF)


def test_merged_pair():
  # A (120) and B (80) predicted as one object of 200: IoU 0.6 with A, 0.4 with B.
  gt = _line({1: (0, 120), 2: (120, 200)})
  pred = _line({7: (0, 200)})
  result = average_precision(gt, pred)
  assert result["ap_50"] == pytest.approx(HALF)
  assert result["ap_75"] == 0.0


def test_missed_instance():
  gt = _line({1: (0, 100), 2: (200, 300)})
  pred = _line({1: (0, 100)})
  assert average_precision(gt, pred)["ap_75"] == pytest.approx(HALF)


def test_false_positive_ranked_after_and_before():
  gt = _line({1: (0, 100)})
  small_fp = _line({1: (0, 100), 2: (300, 350)})
  assert average_precision(gt, small_fp)["ap_75"] == pytest.approx(1.0)
  # a larger FP ranks first: precision 0 then 1/2, made monotone to 1/2.
  large_fp = _line({1: (0, 100), 2: (300, 450)})
  assert average_precision(gt, large_fp)["ap_75"] == pytest.approx(0.5)


def test_crumbs_are_ignored():
  gt = _line({1: (0, 100), 2: (200, 210)})
  pred = _line({1: (0, 100), 2: (200, 210)})
  result = average_precision(gt, pred, min_gt_size=50)
  assert result["num_gt"] == 1 and result["ap_75"] == 1.0
  missed_crumb = average_precision(gt, _line({1: (0, 100)}), min_gt_size=50)
  assert missed_crumb["ap_75"] == 1.0


def test_no_ground_truth_is_nan():
  empty = np.zeros((2, 4, 4), np.uint32)
  assert np.isnan(average_precision(empty, empty)["ap_50"])


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_volumes(seed):
  rng = np.random.default_rng(seed)
  shape = (6, 24, 24)
  gt = np.zeros(shape, np.uint32)
  for i in range(1, 9):
    z, y, x = rng.integers(0, [4, 18, 18])
    dz, dy, dx = rng.integers([1, 3, 3], [3, 8, 8])
    gt[z:z + dz, y:y + dy, x:x + dx] = i
  # prediction: shifted, partly relabelled, with spurious boxes
  pred = np.roll(gt, rng.integers(-2, 3), axis=2) * 3
  pred[rng.random(shape) < 0.05] = 0
  for i in range(40, 44):
    z, y, x = rng.integers(0, [5, 20, 20])
    pred[z:z + 2, y:y + 4, x:x + 4] = i
  min_gt = int(rng.integers(0, 20))
  result = average_precision(gt, pred, min_gt_size=min_gt, slab=2)
  for t in (0.5, 0.75):
    expected = _brute_force_ap(gt, pred, t, min_gt)
    assert result[f"ap_{int(t * 100)}"] == pytest.approx(expected, abs=1e-12)
