"""Foreground (semantic) scores over a whole volume, voxel by voxel.

One confusion count (TP, FP, FN, TN) over every voxel of the volume (not a
mean of per-slice scores), accumulated block by block:
Jaccard = TP / (TP + FP + FN) (Lucchi's "IoU"), Dice = F1 = 2 J / (1 + J),
precision, recall, and the Matthews correlation coefficient
MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) (DA-ISC's metrics).
Empty denominators: Jaccard, Dice, precision and recall are 1 when there is
nothing to find and nothing found; MCC is 0 when a margin is empty.
"""

from __future__ import annotations

import math

import numpy as np

from stt_jax.infer.quantize import level


def overlap_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
  """Jaccard, Dice, precision and recall of voxel counts (1 when empty)."""
  union = tp + fp + fn
  jaccard = tp / union if union else 1.0
  return {"jaccard": jaccard, "dice": 2 * jaccard / (1 + jaccard),
          "precision": tp / (tp + fp) if tp + fp else 1.0,
          "recall": tp / (tp + fn) if tp + fn else 1.0}


class ConfusionCounter:
  """Voxel confusion counts, added block by block (Python ints: no overflow)."""

  def __init__(self):
    self.tp = self.fp = self.fn = self.tn = 0

  def add(self, gt_foreground: np.ndarray, pred_foreground: np.ndarray) -> None:
    gt = np.asarray(gt_foreground, bool)
    pred = np.asarray(pred_foreground, bool)
    if gt.shape != pred.shape:
      raise ValueError(f"shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    tp = int(np.count_nonzero(gt & pred))
    n_gt, n_pred = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
    self.tp += tp
    self.fp += n_pred - tp
    self.fn += n_gt - tp
    self.tn += gt.size - n_gt - n_pred + tp

  def merge(self, other: ConfusionCounter) -> None:
    """Adds another volume's counts: scores over both volumes' voxels."""
    self.tp, self.fp = self.tp + other.tp, self.fp + other.fp
    self.fn, self.tn = self.fn + other.fn, self.tn + other.tn

  def scores(self) -> dict[str, float]:
    tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
    margins = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt(margins) if margins else 0.0
    overlap = overlap_scores(tp, fp, fn)
    return {**overlap, "f1": overlap["dice"], "mcc": mcc}


def foreground_scores(gt_foreground: np.ndarray,
                      pred_foreground: np.ndarray) -> dict[str, float]:
  counter = ConfusionCounter()
  counter.add(gt_foreground, pred_foreground)
  return counter.scores()


class ThresholdSweep:
  """Voxel Jaccard/Dice of `mask > t` for every threshold t at once.

  Adds uint8 mask probabilities (x 255) block by block into two 256-bin
  histograms, one over ground-truth foreground voxels and one over background;
  the count above any level is a cumulative sum. A network trained on
  class-balanced BCE is not calibrated (positives weigh up to 19x), so 0.5 is
  not its natural threshold: this shows where it is, without re-decoding.
  """

  def __init__(self):
    self.fg = np.zeros(256, np.int64)
    self.bg = np.zeros(256, np.int64)

  def add(self, gt_foreground: np.ndarray, mask_u8: np.ndarray) -> None:
    gt = np.asarray(gt_foreground, bool)
    mask = np.asarray(mask_u8)
    if gt.shape != mask.shape or mask.dtype != np.uint8:
      raise ValueError(f"need a uint8 mask of the ground truth's shape {gt.shape}, "
                       f"got {mask.dtype} {mask.shape}")
    self.fg += np.bincount(mask[gt], minlength=256)
    self.bg += np.bincount(mask[~gt], minlength=256)

  def merge(self, other: ThresholdSweep) -> None:
    """Adds another volume's histograms."""
    self.fg += other.fg
    self.bg += other.bg

  def scores(self, thresholds) -> dict[str, dict[str, float]]:
    """{f"{t:.2f}": {"jaccard", "dice", "precision", "recall"}} for each t,
    the prediction being mask_u8 > level(t) = floor(t * 255), the decoder's
    rule (infer/quantize): probability > t."""
    # above[k] = voxels with value > k
    above_fg = self.fg.sum() - np.cumsum(self.fg)
    above_bg = self.bg.sum() - np.cumsum(self.bg)
    n_gt = int(self.fg.sum())
    out = {}
    for t in thresholds:
      k = level(t)
      tp = int(above_fg[k])
      out[f"{float(t):.2f}"] = overlap_scores(tp, int(above_bg[k]), n_gt - tp)
    return out


# Finer at the top: a class-balanced net's best cut sits near 1 - f (f the
# foreground fraction; 1 - f ~ 0.95 on VNC III), where a 0.05 grid would end.
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.96, 0.97, 0.98, 0.99)
