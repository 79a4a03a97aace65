"""What a confidence cut on whole objects would do (`decode.min_mean_mask`):
each predicted object's mean mask probability, and the scores with the
objects below a cut removed, from the same pass over blocks as the report.

A class-balanced net's false positives are partly whole invented objects
(VNC III, README "Where the errors lie"); where their mean mask probability
sits below the true objects', removing them raises precision without
touching any boundary. The sweep shows whether it does, on held-out data,
without re-decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stt_jax.infer import postprocess
from stt_jax.metrics import instance_ap, semantic


# Decoded objects hold voxels above decode.foreground (0.85 by default), so
# their means crowd near the top: 0.01 apart from 0.81.
SWEEP_THRESHOLDS = (tuple(round(0.05 * i, 2) for i in range(1, 17))
                    + tuple(round(0.01 * i, 2) for i in range(81, 100)))


class ObjectMaskTable:
  """Per predicted id: voxels, sum of uint8 mask levels (all its voxels, as
  the decoder sums them), and among voxels with known ground truth: count
  and ground-truth foreground count. Fed block by block."""

  def __init__(self):
    self._parts: list[np.ndarray] = []

  def add(self, pred: np.ndarray, mask_u8: np.ndarray, gt_foreground: np.ndarray,
          known: np.ndarray | None = None) -> None:
    """pred: instance ids; mask_u8: mask probability x 255; gt_foreground:
    bool; known: bool, voxels whose ground truth counts (None: all). One shape."""
    if not pred.shape == mask_u8.shape == gt_foreground.shape:
      raise ValueError(f"shapes differ: prediction {pred.shape}, mask {mask_u8.shape}, "
                       f"ground truth {gt_foreground.shape}")
    inside = pred > 0
    ids, inverse = np.unique(pred[inside], return_inverse=True)
    if not len(ids):
      return
    known = np.ones(pred.shape, bool) if known is None else known
    columns = [np.bincount(inverse, weights=w, minlength=len(ids))
               for w in (None, mask_u8[inside], known[inside],
                         (known & gt_foreground)[inside])]
    self._parts.append(np.column_stack([ids.astype(np.float64), *columns]))

  def rows(self) -> dict[str, np.ndarray]:
    """{"ids", "sizes", "mask_sums", "known", "on_gt"}, one entry per id, sorted."""
    names = ("ids", "sizes", "mask_sums", "known", "on_gt")
    if not self._parts:
      return {n: np.zeros(0, np.int64) for n in names}
    table = np.concatenate(self._parts)
    ids, inverse = np.unique(table[:, 0], return_inverse=True)
    out = {"ids": ids.astype(np.int64)}
    for k, name in enumerate(names[1:], start=1):
      out[name] = np.rint(np.bincount(inverse, weights=table[:, k])).astype(np.int64)
    return out


def _drop_predictions(counts, dropped_ids: np.ndarray):
  gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred, pair_counts = counts
  keep = ~np.isin(pred_ids, dropped_ids.astype(np.uint64))
  keep_pairs = ~np.isin(pair_pred, dropped_ids.astype(np.uint64))
  return (gt_ids, gt_sizes, pred_ids[keep], pred_sizes[keep], pair_gt[keep_pairs],
          pair_pred[keep_pairs], pair_counts[keep_pairs])


def sweep(tables: Sequence[dict[str, np.ndarray]], counts: Sequence, confusion,
          thresholds: Sequence[float], *, min_gt_size: int) -> dict[str, dict]:
  """{f"{t:.2f}": {"jaccard", "dice", "precision", "recall", "ap_50",
  "ap_75", "num_pred"}}: the scores with every object whose mean mask
  probability is below t removed (`postprocess.below_mean_mask`, the
  decoder's rule), for volumes scored as one set: `tables[i]` (`rows()`) and
  `counts[i]` (`OverlapCounter.counts()`, unlabelled set aside) of volume i,
  `confusion` the set's pooled `semantic.ConfusionCounter`."""
  out = {}
  for t in thresholds:
    tp, fp, fn = confusion.tp, confusion.fp, confusion.fn
    kept_counts = []
    for table, volume_counts in zip(tables, counts):
      drop = postprocess.below_mean_mask(table["mask_sums"], table["sizes"], float(t))
      lost_tp = int(table["on_gt"][drop].sum())
      tp, fn = tp - lost_tp, fn + lost_tp
      fp -= int((table["known"][drop] - table["on_gt"][drop]).sum())
      kept_counts.append(_drop_predictions(volume_counts, table["ids"][drop]))
    pooled = instance_ap.pool_counts(kept_counts) if len(kept_counts) > 1 else kept_counts[0]
    ap = instance_ap.ap_from_counts(pooled, min_gt_size=min_gt_size, thresholds=(0.5, 0.75))
    out[f"{float(t):.2f}"] = {**semantic.overlap_scores(tp, fp, fn),
                              "ap_50": ap["ap_50"], "ap_75": ap["ap_75"],
                              "num_pred": ap["num_pred"]}
  return out
