"""3D instance average precision, the MitoEM protocol (COCO-style in 3D).

* Overlaps are counted sparsely, slab by slab: only (gt id, pred id) pairs that
  share a voxel are ever stored, never a dense N x M matrix of the volume.
* Predictions are ranked by voxel count (the challenge's score), largest
  first; ties keep id order.
* Ground-truth instances smaller than `min_gt_size` ("crumbs") are ignored: a
  prediction matched to one counts as neither TP nor FP.
* At IoU threshold t each prediction, in rank order, takes the unmatched
  non-ignored ground truth with the highest IoU >= t (ignored ones only when
  no other qualifies). Precision is made monotone and read at 101 recall
  points 0, 0.01, ..., 1; AP is their mean. No ground truth -> NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import fastremap
import numpy as np

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _accumulate(keys_list, counts_list):
  if not keys_list:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  keys = np.concatenate(keys_list)
  counts = np.concatenate(counts_list)
  uniq, inverse = np.unique(keys, return_inverse=True)
  return uniq, np.bincount(inverse, weights=counts).astype(np.int64)


class OverlapCounter:
  """Sparse sizes and overlaps of two label volumes, fed block by block.

  Memory: the distinct ids and (gt, pred) pairs, never a voxel array beyond
  the block being added.
  """

  def __init__(self):
    self._parts = {"gt": ([], []), "pred": ([], []), "pair": ([], [])}

  def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
    """gt, pred: label blocks of one shape (ids > 0 are instances)."""
    if gt.shape != pred.shape:
      raise ValueError(f"shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    g = np.asarray(gt).ravel()
    p = np.asarray(pred).ravel()
    for name, ids in (("gt", g), ("pred", p)):
      u, c = fastremap.unique(ids, return_counts=True)
      keep = u > 0
      self._parts[name][0].append(u[keep].astype(np.uint64))
      self._parts[name][1].append(c[keep].astype(np.int64))
    both = (g > 0) & (p > 0)
    keys = (g[both].astype(np.uint64) << np.uint64(32)) | p[both].astype(np.uint64)
    u, c = fastremap.unique(keys, return_counts=True)
    self._parts["pair"][0].append(u.astype(np.uint64))
    self._parts["pair"][1].append(c.astype(np.int64))
    for name, (keys_list, counts_list) in self._parts.items():
      if len(keys_list) >= 64:  # keep the lists short: fold them
        k, c = _accumulate(keys_list, counts_list)
        self._parts[name] = ([k], [c])

  def counts(self):
    """(gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred, pair_counts)."""
    gt_ids, gt_sizes = _accumulate(*self._parts["gt"])
    pred_ids, pred_sizes = _accumulate(*self._parts["pred"])
    pair_keys, pair_counts = _accumulate(*self._parts["pair"])
    pair_gt = pair_keys >> np.uint64(32)
    pair_pred = pair_keys & np.uint64(0xFFFFFFFF)
    return gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred, pair_counts


def overlap_counts(gt: np.ndarray, pred: np.ndarray, slab: int = 16):
  """Sparse sizes and overlaps of two in-memory label volumes
  [depth, height, width], counted `slab` sections at a time.

  Returns (gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred,
  pair_counts), ids > 0 only.
  """
  if gt.shape != pred.shape:
    raise ValueError(f"shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
  counter = OverlapCounter()
  for z in range(0, gt.shape[0], slab):
    counter.add(gt[z:z + slab], pred[z:z + slab])
  return counter.counts()


def set_aside_unlabelled(counts, unlabelled_id: int):
  """`OverlapCounter.counts()` of partly annotated ground truth, where id
  `unlabelled_id` marks voxels nobody annotated: that id is no instance, and
  a prediction with more than half its voxels on it is dropped (it may be a
  real, unannotated object: neither TP nor FP, like COCO's crowd regions).
  Predictions reaching less far in keep all their voxels."""
  gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred, pair_counts = counts
  on_unlabelled = pair_gt == np.uint64(unlabelled_id)
  reach = dict(zip(pair_pred[on_unlabelled].tolist(), pair_counts[on_unlabelled].tolist()))
  dropped = np.array([2 * reach.get(int(p), 0) > s for p, s in zip(pred_ids, pred_sizes)],
                     bool)
  kept_pairs = ~on_unlabelled & ~np.isin(pair_pred, pred_ids[dropped])
  kept_gt = gt_ids != np.uint64(unlabelled_id)
  return (gt_ids[kept_gt], gt_sizes[kept_gt], pred_ids[~dropped], pred_sizes[~dropped],
          pair_gt[kept_pairs], pair_pred[kept_pairs], pair_counts[kept_pairs])


def pool_counts(counts_list):
  """One `OverlapCounter.counts()` for several volumes scored as one set:
  each volume's ids are renumbered 1, 2, ... after the previous volume's, in
  id order, so instances of different volumes never meet and ties in rank
  keep (volume, id) order: the counts of the volumes laid side by side with
  disjoint ids."""
  parts = [[] for _ in range(7)]
  next_gt = next_pred = 1
  for gt_ids, gt_sizes, pred_ids, pred_sizes, pair_gt, pair_pred, pair_counts in counts_list:
    # ids come sorted (np.unique), so searchsorted maps each to its rank
    parts[0].append(np.arange(next_gt, next_gt + len(gt_ids), dtype=np.uint64))
    parts[1].append(gt_sizes)
    parts[2].append(np.arange(next_pred, next_pred + len(pred_ids), dtype=np.uint64))
    parts[3].append(pred_sizes)
    parts[4].append(np.searchsorted(gt_ids, pair_gt).astype(np.uint64) + np.uint64(next_gt))
    parts[5].append(np.searchsorted(pred_ids, pair_pred).astype(np.uint64)
                    + np.uint64(next_pred))
    parts[6].append(pair_counts)
    next_gt += len(gt_ids)
    next_pred += len(pred_ids)
  empty = (np.uint64, np.int64, np.uint64, np.int64, np.uint64, np.uint64, np.int64)
  return tuple(np.concatenate(p) if p else np.zeros(0, d) for p, d in zip(parts, empty))


def _match(iou_rows, gt_ignored, num_pred, threshold) -> tuple[np.ndarray, np.ndarray]:
  """(is_tp, is_ignored) of each prediction at IoU `threshold`; iou_rows[d]:
  list of (gt_index, iou) for prediction d in rank order."""
  gt_match = np.full(len(gt_ignored), -1)
  is_tp = np.zeros(num_pred, bool)
  is_ignored = np.zeros(num_pred, bool)
  for d in range(num_pred):
    best, match = min(threshold, 1 - 1e-10), -1
    # non-ignored ground truth first; an ignored one only if none qualifies
    for g, iou in iou_rows[d]:
      if gt_match[g] >= 0:
        continue
      if match >= 0 and not gt_ignored[match] and gt_ignored[g]:
        break
      if iou < best:
        continue
      best, match = iou, g
    if match >= 0:
      gt_match[match] = d
      is_ignored[d] = gt_ignored[match]
      is_tp[d] = not gt_ignored[match]
  return is_tp, is_ignored


def ap_from_flags(is_tp: np.ndarray, is_ignored: np.ndarray, num_gt: float,
                  weights: np.ndarray | None = None) -> float:
  """AP of predictions in rank order from their match flags; `weights`
  (default 1) counts prediction d as weights[d] copies of itself in place,
  which is what a bootstrap draw of whole units does (`uncertainty`).
  No ground truth -> NaN."""
  if num_gt <= 0:
    return float("nan")
  num_pred = len(is_tp)
  w = np.ones(num_pred) if weights is None else np.asarray(weights, np.float64)
  tp = np.cumsum(w * (is_tp & ~is_ignored))
  fp = np.cumsum(w * (~is_tp & ~is_ignored))
  recall = tp / num_gt
  precision = tp / np.maximum(tp + fp, np.spacing(1))
  precision = np.maximum.accumulate(precision[::-1])[::-1] if num_pred else precision
  idx = np.searchsorted(recall, RECALL_POINTS, side="left")
  sampled = np.where(idx < num_pred, precision[np.minimum(idx, max(num_pred - 1, 0))]
                     if num_pred else 0.0, 0.0)
  return float(np.mean(sampled))


def average_precision(gt: np.ndarray, pred: np.ndarray, *, min_gt_size: int = 0,
                      thresholds: Sequence[float] = IOU_THRESHOLDS,
                      slab: int = 16) -> dict[str, float]:
  """AP of instance labels `pred` against `gt` ([depth, height, width] ints).

  Returns {"ap_50": .., "ap_75": .., "ap": mean over `thresholds`,
  "num_gt": .., "num_pred": ..}, with "ap_<t*100>" for every threshold.
  """
  return ap_from_counts(overlap_counts(gt, pred, slab), min_gt_size=min_gt_size,
                        thresholds=thresholds)


def matches(counts, *, min_gt_size: int = 0,
            thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
  """The matching behind AP: {"pred_ids", "gt_ids" (rank orders: predictions
  largest first, ties by id; ground truth non-ignored first), "gt_ignored",
  "flags": {threshold: (is_tp, is_ignored)}} from `OverlapCounter.counts()`."""
  gt_ids, gt_sizes, pred_ids, pred_sizes, pg, pp, pc = counts
  order = np.lexsort((pred_ids, -pred_sizes))  # largest first, ties by id
  pred_ids, pred_sizes = pred_ids[order], pred_sizes[order]
  gt_ignored = gt_sizes < min_gt_size
  gt_order = np.lexsort((gt_ids, gt_ignored))  # non-ignored first
  gt_ids, gt_sizes, gt_ignored = gt_ids[gt_order], gt_sizes[gt_order], gt_ignored[gt_order]
  gt_index = {int(i): k for k, i in enumerate(gt_ids)}
  pred_index = {int(i): k for k, i in enumerate(pred_ids)}
  iou_rows: list[list[tuple[int, float]]] = [[] for _ in pred_ids]
  for g, p, c in zip(pg.tolist(), pp.tolist(), pc.tolist()):
    gi, di = gt_index[g], pred_index[p]
    iou = c / (gt_sizes[gi] + pred_sizes[di] - c)
    iou_rows[di].append((gi, iou))
  for row in iou_rows:
    row.sort()  # gt rank order: non-ignored first
  return {"pred_ids": pred_ids, "gt_ids": gt_ids, "gt_ignored": gt_ignored,
          "flags": {t: _match(iou_rows, gt_ignored, len(pred_ids), t) for t in thresholds}}


def ap_from_counts(counts, *, min_gt_size: int = 0,
                   thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
  """`average_precision` from `OverlapCounter.counts()`."""
  m = matches(counts, min_gt_size=min_gt_size, thresholds=thresholds)
  num_gt = int(np.count_nonzero(~m["gt_ignored"]))
  result = {}
  for t in thresholds:
    result[f"ap_{int(round(t * 100))}"] = ap_from_flags(*m["flags"][t], num_gt)
  result["ap"] = float(np.mean([result[f"ap_{int(round(t * 100))}"] for t in thresholds]))
  result["num_gt"] = num_gt
  result["num_pred"] = int(len(m["pred_ids"]))
  return result
