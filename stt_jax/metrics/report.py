"""Scores a segmentation against ground truth in one pass over blocks and
prints one table (protocols: metrics/instance_ap.py, metrics/semantic.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stt_jax.errors import UserError
from stt_jax.metrics import instance_ap, semantic

ROWS = (("AP-50", "ap_50"), ("AP-75", "ap_75"), ("AP-50:95", "ap_50_95"),
        ("foreground Jaccard", "jaccard"), ("foreground Dice / F1", "dice"),
        ("voxel precision", "precision"), ("voxel recall", "recall"),
        ("voxel MCC", "mcc"), ("GT instances", "num_gt"),
        ("predicted instances", "num_pred"))


def _shape(volume) -> tuple[int, ...]:
  return tuple(volume.shape)


def _read(volume, start, stop) -> np.ndarray:
  if isinstance(volume, np.ndarray):
    return volume[tuple(slice(a, b) for a, b in zip(start, stop))]
  return volume.read(start, [b - a for a, b in zip(start, stop)])


def score_volumes(gt_labels, instances, *, min_gt_size: int,
                  block: Sequence[int] = (64, 512, 512),
                  probabilities=None) -> dict:
  """AP-50/75/50:95 (MitoEM), foreground Jaccard/Dice (Lucchi), voxel
  precision/recall/F1/MCC (DA-ISC), for label volumes (numpy arrays or
  data-layer Volumes) read one block at a time.

  With `probabilities` (the [z, y, x, channels] uint8 maps the instances were
  decoded from), the same pass also scores mask > t for t = 0.05, 0.10 ...
  0.95, 0.96 ... 0.99 (`semantic.ThresholdSweep`): "mask_threshold_sweep" and
  the best t by Jaccard. Voxelwise, before instance decoding and size
  filtering, so at t = decode.foreground it is close to, not equal to, the
  Jaccard above."""
  from stt_jax.infer import blocks  # pylint: disable=g-import-not-at-top
  if _shape(gt_labels)[:3] != _shape(instances)[:3]:
    raise UserError(f"ground truth {_shape(gt_labels)} and segmentation "
                    f"{_shape(instances)} differ in shape")
  overlaps = instance_ap.OverlapCounter()
  confusion = semantic.ConfusionCounter()
  sweep = semantic.ThresholdSweep() if probabilities is not None else None
  for b in blocks.iterate(_shape(gt_labels)[:3], block):
    g, p = _read(gt_labels, b.start, b.stop), _read(instances, b.start, b.stop)
    overlaps.add(g, p)
    confusion.add(g > 0, p > 0)
    if sweep is not None:
      sweep.add(g > 0, _read(probabilities, (*b.start, 0), (*b.stop, 1))[..., 0])
  ap = instance_ap.ap_from_counts(overlaps.counts(), min_gt_size=min_gt_size)
  fg = confusion.scores()
  out = {"ap_50": ap["ap_50"], "ap_75": ap["ap_75"], "ap_50_95": ap["ap"], **fg,
         "num_gt": ap["num_gt"], "num_pred": ap["num_pred"]}
  if sweep is not None:
    table = sweep.scores(semantic.SWEEP_THRESHOLDS)
    best = max(table, key=lambda t: table[t]["jaccard"])
    out.update(mask_threshold_sweep=table, best_mask_threshold=float(best),
               best_mask_threshold_jaccard=table[best]["jaccard"])
  return out


def score(gt_labels: np.ndarray, instances: np.ndarray, *,
          min_gt_size: int) -> dict[str, float]:
  """`score_volumes` of two in-memory volumes."""
  return score_volumes(gt_labels, instances, min_gt_size=min_gt_size)


def format_table(scores: dict[str, float], title: str) -> str:
  lines = [title, "-" * 34]
  for name, key in ROWS:
    value = scores[key]
    text = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
    lines.append(f"{name:<22}{text:>12}")
  return "\n".join(lines)
