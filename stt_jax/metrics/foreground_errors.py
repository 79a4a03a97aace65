"""Where a foreground prediction's errors lie.

A voxel Jaccard says how much is wrong, not what kind of wrong. False
positives next to a true object are boundary placement (calibration, the
decoding threshold); false positives far from any are objects the network
invented; false negatives inside wholly missed objects are objects it never
saw. Distances are in-plane (per section, in pixels), since EM sections are
often far coarser in z; objects are 6-connected 3D components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from stt_jax.metrics import semantic

DISTANCE_EDGES = (2, 4, 8, 16)   # pixels: bins [0, 2), [2, 4), [4, 8), [8, 16), [16, inf)


def _in_plane_distance(target: np.ndarray) -> np.ndarray:
  """[z, y, x] float: each voxel's in-plane distance to the nearest `target`
  voxel of its own section (inf in a section without one)."""
  out = np.full(target.shape, np.inf)
  for z, section in enumerate(target):
    if section.any():
      out[z] = ndimage.distance_transform_edt(~section)
  return out


def _share_in_unmatched_objects(errors: np.ndarray, objects: np.ndarray,
                                other: np.ndarray, overlap: float) -> float:
  """Fraction of `errors` voxels lying in components of `objects` of which
  less than `overlap` is covered by `other`."""
  labels, n = ndimage.label(objects)
  if not n or not errors.any():
    return 0.0
  index = np.arange(1, n + 1)
  sizes = ndimage.sum_labels(np.ones(objects.shape), labels, index)
  covered = ndimage.sum_labels(other, labels, index)
  unmatched = np.zeros(n + 1, bool)
  unmatched[1:] = covered < overlap * sizes
  return float(np.count_nonzero(unmatched[labels] & errors) / np.count_nonzero(errors))


def _histogram(distances: np.ndarray, edges: Sequence[int]) -> dict[str, float]:
  bounds = (0, *edges, np.inf)
  total = max(distances.size, 1)
  # the last bin holds the infinite distances too (a section without the other)
  return {f"[{lo}, {hi})": float(np.count_nonzero(
              (distances >= lo) & ((distances < hi) | (hi == np.inf))) / total)
          for lo, hi in zip(bounds[:-1], bounds[1:])}


def error_breakdown(gt_foreground: np.ndarray, pred_foreground: np.ndarray, *,
                    object_overlap: float = 0.2,
                    edges: Sequence[int] = DISTANCE_EDGES) -> dict:
  """gt_foreground, pred_foreground: [z, y, x] bool, read whole (a validation
  region, not a volume larger than memory).

  Returns the voxel counts (tp, fp, fn, jaccard); the fractions of false
  positives by in-plane distance to the nearest true voxel
  (`fp_by_distance`) and of false negatives by distance to the nearest
  predicted one (`fn_by_distance`); the fraction of false positives in
  predicted objects less than `object_overlap` of which is true foreground
  (`fp_in_false_objects`) and of false negatives in true objects less than
  that fraction of which is predicted (`fn_in_missed_objects`); and the
  Jaccard were the false positives within each edge's distance of a true
  voxel right (`jaccard_without_fp_within`: what boundary placement alone
  would be worth).
  """
  gt = np.asarray(gt_foreground, bool)
  pred = np.asarray(pred_foreground, bool)
  if gt.shape != pred.shape or gt.ndim != 3:
    raise ValueError(f"need two [z, y, x] masks of one shape, got {gt.shape} and {pred.shape}")
  fp_mask, fn_mask = pred & ~gt, gt & ~pred
  tp = int(np.count_nonzero(gt & pred))
  fp, fn = int(np.count_nonzero(fp_mask)), int(np.count_nonzero(fn_mask))
  fp_distance = _in_plane_distance(gt)[fp_mask]
  fn_distance = _in_plane_distance(pred)[fn_mask]
  jaccard = lambda false_positives: semantic.overlap_scores(tp, false_positives, fn)["jaccard"]
  return {
      "tp": tp, "fp": fp, "fn": fn, "jaccard": jaccard(fp),
      "fp_by_distance": _histogram(fp_distance, edges),
      "fn_by_distance": _histogram(fn_distance, edges),
      "fp_in_false_objects": _share_in_unmatched_objects(fp_mask, pred, gt, object_overlap),
      "fn_in_missed_objects": _share_in_unmatched_objects(fn_mask, gt, pred, object_overlap),
      "jaccard_without_fp_within": {
          str(e): jaccard(fp - int(np.count_nonzero(fp_distance < e))) for e in edges},
  }


def format_breakdown(b: dict) -> str:
  """Two lines for a console."""
  fp = ", ".join(f"{k} {v:.0%}" for k, v in b["fp_by_distance"].items())
  fn = ", ".join(f"{k} {v:.0%}" for k, v in b["fn_by_distance"].items())
  return (f"false positives by in-plane distance to the truth (px): {fp}; "
          f"{b['fp_in_false_objects']:.0%} in invented objects\n"
          f"false negatives by distance to the prediction (px): {fn}; "
          f"{b['fn_in_missed_objects']:.0%} in missed objects")
