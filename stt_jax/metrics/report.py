"""Scores a segmentation against ground truth in one pass over blocks and
prints one table (protocols: metrics/instance_ap.py, metrics/semantic.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stt_jax.errors import UserError
from stt_jax.metrics import instance_ap, object_confidence, semantic, uncertainty

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


def _check_same_shape(gt_labels, instances) -> None:
  if _shape(gt_labels)[:3] != _shape(instances)[:3]:
    raise UserError(f"ground truth {_shape(gt_labels)} and segmentation "
                    f"{_shape(instances)} differ in shape")


def _whole_objects(instances, probabilities, block: Sequence[int]) -> dict:
  """`ObjectMaskTable.rows()` sizes and mask sums over a whole volume."""
  from stt_jax.infer import blocks  # pylint: disable=g-import-not-at-top
  table = object_confidence.ObjectMaskTable()
  for b in blocks.iterate(_shape(instances)[:3], block):
    p = _read(instances, b.start, b.stop)
    table.add(p, _read(probabilities, (*b.start, 0), (*b.stop, 1))[..., 0],
              np.zeros(p.shape, bool))
  return table.rows()


def _tally(gt_labels, instances, block: Sequence[int], probabilities=None,
           unlabelled_id: int = -1, whole=None):
  """One volume's (overlap counts, ConfusionCounter, ThresholdSweep or None,
  TileConfusion, ObjectMaskTable rows or None), one block at a time. Voxels
  labelled `unlabelled_id` are left out of the voxel counts; the overlap
  counts keep them (AP sets them aside). `whole`: (instances,
  probabilities) of the volume that `instances` is a region of (validation
  with data.val.context), whose objects' means the decoder saw: the rows'
  sizes and mask sums are taken from it."""
  from stt_jax.infer import blocks  # pylint: disable=g-import-not-at-top
  _check_same_shape(gt_labels, instances)
  overlaps = instance_ap.OverlapCounter()
  confusion = semantic.ConfusionCounter()
  sweep = semantic.ThresholdSweep() if probabilities is not None else None
  objects = object_confidence.ObjectMaskTable() if probabilities is not None else None
  tiles = uncertainty.TileConfusion()
  for b in blocks.iterate(_shape(gt_labels)[:3], block):
    g, p = _read(gt_labels, b.start, b.stop), _read(instances, b.start, b.stop)
    overlaps.add(g, p)
    known = None if unlabelled_id < 0 else g != unlabelled_id
    tiles.add(g > 0, p > 0, b.start, valid=known)
    cut = slice(None) if known is None else known
    if sweep is not None:
      mask = _read(probabilities, (*b.start, 0), (*b.stop, 1))[..., 0]
      sweep.add(g[cut] > 0, mask[cut])
      objects.add(p, mask, g > 0, known)
    confusion.add(g[cut] > 0, p[cut] > 0)
  rows = objects.rows() if objects is not None else None
  if rows is not None and whole is not None:
    everywhere = _whole_objects(*whole, block)
    at = np.searchsorted(everywhere["ids"], rows["ids"])
    rows["sizes"], rows["mask_sums"] = everywhere["sizes"][at], everywhere["mask_sums"][at]
  return overlaps.counts(), confusion, sweep, tiles, rows


def _scores(counts, confusion: semantic.ConfusionCounter,
            sweep: semantic.ThresholdSweep | None, min_gt_size: int) -> dict:
  ap = instance_ap.ap_from_counts(counts, min_gt_size=min_gt_size)
  out = {"ap_50": ap["ap_50"], "ap_75": ap["ap_75"], "ap_50_95": ap["ap"],
         **confusion.scores(), "num_gt": ap["num_gt"], "num_pred": ap["num_pred"]}
  if sweep is not None:
    table = sweep.scores(semantic.SWEEP_THRESHOLDS)
    best = max(table, key=lambda t: table[t]["jaccard"])
    out.update(mask_threshold_sweep=table, best_mask_threshold=float(best),
               best_mask_threshold_jaccard=table[best]["jaccard"])
  return out


def _object_sweep(tallies, counts, confusion, min_gt_size: int) -> dict:
  """eval.json's "object_mean_mask_sweep" (`object_confidence.sweep`) and the
  best cut by Jaccard ("best_object_mean_mask", lowest on ties)."""
  table = object_confidence.sweep([t[4] for t in tallies], counts, confusion,
                                  object_confidence.SWEEP_THRESHOLDS, min_gt_size=min_gt_size)
  best = max(table, key=lambda t: (table[t]["jaccard"], -float(t)))
  return {"object_mean_mask_sweep": table, "best_object_mean_mask": float(best),
          "best_object_mean_mask_jaccard": table[best]["jaccard"]}


def format_object_sweep(scores: dict, min_mean_mask: float) -> str:
  """One line: the best cut of the object sweep, or that none raises the
  Jaccard above the decoding's own (made with `min_mean_mask`)."""
  best = scores["best_object_mean_mask"]
  row = scores["object_mean_mask_sweep"][f"{best:.2f}"]
  if row["jaccard"] > scores["jaccard"]:
    found = (f"best Jaccard {row['jaccard']:.4f} at s = {best:.2f} ({row['num_pred']} "
             f"instances, AP-75 {row['ap_75']:.4f}); decode.min_mean_mask is "
             f"{min_mean_mask:.2f}")
  else:
    found = f"no cut above decode.min_mean_mask {min_mean_mask:.2f} raises the Jaccard"
  return (f"objects of mean mask probability < s removed: {found} "
          "(eval.json: object_mean_mask_sweep)")


def score_volumes(gt_labels, instances, *, min_gt_size: int,
                  block: Sequence[int] = (64, 512, 512),
                  probabilities=None, unlabelled_id: int = -1) -> dict:
  """AP-50/75/50:95 (MitoEM), foreground Jaccard/Dice (Lucchi), voxel
  precision/recall/F1/MCC (DA-ISC), for label volumes (numpy arrays or
  data-layer Volumes) read one block at a time.

  With `probabilities` (the [z, y, x, channels] uint8 maps the instances were
  decoded from), the same pass also scores mask > t for t = 0.05, 0.10 ...
  0.95, 0.96 ... 0.99 (`semantic.ThresholdSweep`): "mask_threshold_sweep" and
  the best t by Jaccard. Voxelwise, before instance decoding and size
  filtering, so at t = decode.foreground it is close to, not equal to, the
  Jaccard above. And "object_mean_mask_sweep": the instances' scores with
  the objects whose mean mask probability is below each t removed (what
  decode.min_mean_mask = t would add to this decoding; `object_confidence`).

  With `unlabelled_id` >= 0 (partly annotated ground truth), voxels of that
  id count in no voxel score, and a predicted instance lying mostly (over
  half its voxels) in them is set aside from AP, neither TP nor FP
  (`instance_ap.set_aside_unlabelled`)."""
  return score_volume_set([(gt_labels, instances, probabilities)],
                          min_gt_size=min_gt_size, block=block,
                          unlabelled_id=unlabelled_id)


def score_volume_set(volumes: Sequence[tuple], *, min_gt_size: int,
                     block: Sequence[int] = (64, 512, 512),
                     unlabelled_id: int = -1) -> dict:
  """`score_volumes` of several (gt_labels, instances, probabilities or None
  [, (whole instances, whole probabilities) of which these are a region])
  scored as one set: AP ranks the instances of all volumes together (as if
  the volumes lay side by side), Jaccard and the sweep pool their voxels.
  With more than one volume, "per_volume" holds each one's own scores (no
  sweep); the sweep needs probabilities for every volume."""
  tallies = [_tally(v[0], v[1], block, v[2], unlabelled_id, v[3] if len(v) > 3 else None)
             for v in volumes]
  confusion = semantic.ConfusionCounter()
  sweep = semantic.ThresholdSweep() if all(t[2] is not None for t in tallies) else None
  tiles = uncertainty.TileConfusion()
  for i, (_, volume_confusion, volume_sweep, volume_tiles, _) in enumerate(tallies):
    confusion.merge(volume_confusion)
    tiles.merge(volume_tiles, key=(i,))
    if sweep is not None:
      sweep.merge(volume_sweep)
  counts = [instance_ap.set_aside_unlabelled(t[0], unlabelled_id) if unlabelled_id >= 0
            else t[0] for t in tallies]
  pooled = instance_ap.pool_counts(counts) if len(counts) > 1 else counts[0]
  out = _scores(pooled, confusion, sweep, min_gt_size)
  if sweep is not None:
    out.update(_object_sweep(tallies, counts, confusion, min_gt_size))
  out.update(uncertainty.jaccard_interval(tiles.matrix()))
  out.update(uncertainty.ap_intervals(pooled, min_gt_size=min_gt_size))
  if len(tallies) > 1:
    out["per_volume"] = [_scores(c, t[1], None, min_gt_size) for c, t in zip(counts, tallies)]
  return out


def compare(gt_labels, instances_a, instances_b, *, block: Sequence[int] = (64, 512, 512),
            unlabelled_id: int = -1, min_gt_size: int = 0) -> dict:
  """Two segmentations of the same labels, A minus B: foreground Jaccard
  with its paired tile-bootstrap interval (`uncertainty.paired_difference`)
  and AP-50/AP-75 with theirs (`uncertainty.paired_ap_difference`, keys
  "ap_50_difference" ...). One pass reading each block of the three
  volumes once."""
  from stt_jax.infer import blocks  # pylint: disable=g-import-not-at-top
  shape = _shape(gt_labels)[:3]
  for seg in (instances_a, instances_b):
    _check_same_shape(gt_labels, seg)
  tiles = [uncertainty.TileConfusion(), uncertainty.TileConfusion()]
  overlaps = [instance_ap.OverlapCounter() for _ in range(3)]  # gt-A, gt-B, A-B
  for b in blocks.iterate(shape, block):
    g = _read(gt_labels, b.start, b.stop)
    known = None if unlabelled_id < 0 else g != unlabelled_id
    segs = [_read(seg, b.start, b.stop) for seg in (instances_a, instances_b)]
    for p, tally, overlap in zip(segs, tiles, overlaps):
      overlap.add(g, p)
      tally.add(g > 0, p > 0, b.start, valid=known)
    overlaps[2].add(*segs)
  order = sorted(set(tiles[0].counts) | set(tiles[1].counts))
  counts = [o.counts() for o in overlaps[:2]]
  if unlabelled_id >= 0:
    counts = [instance_ap.set_aside_unlabelled(c, unlabelled_id) for c in counts]
  # predictions set aside on unlabelled voxels are in no group: drop their pairs
  between = overlaps[2].counts()
  keep = np.isin(between[4], counts[0][2]) & np.isin(between[5], counts[1][2])
  between = (*between[:4], between[4][keep], between[5][keep], between[6][keep])
  return dict(uncertainty.paired_difference(tiles[0].matrix(order), tiles[1].matrix(order)),
              **uncertainty.paired_ap_difference(*counts, between, min_gt_size=min_gt_size))


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
  interval = uncertainty.format_interval(scores)
  return "\n".join(lines + ([interval] if interval else []))


def format_volume_rows(volumes: Sequence[dict]) -> str:
  """One line per volume of `score_volume_set`'s "per_volume" (with
  "volume", its path, and "volume_shape")."""
  lines = [f"{'':3}{'AP-50':>7}{'AP-75':>7}{'Jaccard':>9}{'Dice':>7}{'GT':>6}{'pred':>6}  volume"]
  for i, v in enumerate(volumes):
    lines.append(f"{i:<3}{v['ap_50']:>7.4f}{v['ap_75']:>7.4f}{v['jaccard']:>9.4f}"
                 f"{v['dice']:>7.4f}{v['num_gt']:>6d}{v['num_pred']:>6d}  {v['volume']} "
                 f"{tuple(v['volume_shape'])}")
  return "\n".join(lines)
