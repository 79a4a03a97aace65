"""Foreground (semantic) scores, the Lucchi protocol: one confusion count over
the whole volume, Jaccard = TP / (TP + FP + FN), Dice = 2 J / (1 + J)."""

from __future__ import annotations

import numpy as np


def foreground_scores(gt_foreground: np.ndarray,
                      pred_foreground: np.ndarray) -> dict[str, float]:
  gt = np.asarray(gt_foreground, bool)
  pred = np.asarray(pred_foreground, bool)
  if gt.shape != pred.shape:
    raise ValueError(f"shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
  tp = int(np.count_nonzero(gt & pred))
  fp = int(np.count_nonzero(~gt & pred))
  fn = int(np.count_nonzero(gt & ~pred))
  union = tp + fp + fn
  jaccard = tp / union if union else 1.0
  return {"jaccard": jaccard, "dice": 2 * jaccard / (1 + jaccard),
          "precision": tp / (tp + fp) if tp + fp else 1.0,
          "recall": tp / (tp + fn) if tp + fn else 1.0}
