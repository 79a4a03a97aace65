"""Scores a segmentation against ground truth and prints one table."""

from __future__ import annotations

import numpy as np

from stt_jax.metrics import instance_ap, semantic


def score(gt_labels: np.ndarray, instances: np.ndarray, *,
          min_gt_size: int) -> dict[str, float]:
  """AP-50/75 (MitoEM) and foreground Jaccard/Dice (Lucchi) in one dict."""
  ap = instance_ap.average_precision(gt_labels, instances, min_gt_size=min_gt_size)
  fg = semantic.foreground_scores(gt_labels > 0, instances > 0)
  return {"ap_50": ap["ap_50"], "ap_75": ap["ap_75"], "ap_50_95": ap["ap"],
          "jaccard": fg["jaccard"], "dice": fg["dice"],
          "precision": fg["precision"], "recall": fg["recall"],
          "num_gt": ap["num_gt"], "num_pred": ap["num_pred"]}


def format_table(scores: dict[str, float], title: str) -> str:
  rows = [("AP-50", "ap_50"), ("AP-75", "ap_75"), ("AP-50:95", "ap_50_95"),
          ("foreground Jaccard", "jaccard"), ("foreground Dice", "dice"),
          ("voxel precision", "precision"), ("voxel recall", "recall"),
          ("GT instances", "num_gt"), ("predicted instances", "num_pred")]
  lines = [title, "-" * 34]
  for name, key in rows:
    value = scores[key]
    text = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
    lines.append(f"{name:<22}{text:>12}")
  return "\n".join(lines)
