"""Real mitochondria (UroCell, FIB-SEM, ../shared/data/urocell): AP of the
real labels against perturbed copies equals a brute-force reference, and the
morphology report's volumes are voxel counts times the voxel size."""

import numpy as np
import pytest
from scipy import ndimage

from stt_jax.metrics import morphology
from stt_jax.metrics.instance_ap import average_precision

UROCELL_VOXEL_NM = (15.0, 16.0, 16.0)  # z, y, x (the data set's README)


def _pairwise_iou(gt, pred):
  """{(pred id, gt id): IoU} for every overlapping pair, box by box."""
  g_box = dict(enumerate(ndimage.find_objects(gt), 1))
  p_box = dict(enumerate(ndimage.find_objects(pred), 1))
  g_size, p_size = np.bincount(gt.ravel()), np.bincount(pred.ravel())
  iou = {}
  for p, pb in p_box.items():
    if pb is None:
      continue
    for g, gb in g_box.items():
      if gb is None:
        continue
      box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(pb, gb))
      if any(s.start >= s.stop for s in box):
        continue
      inter = int(np.sum((pred[box] == p) & (gt[box] == g)))
      if inter:
        iou[p, g] = inter / (p_size[p] + g_size[g] - inter)
  return iou, p_size, [g for g, b in g_box.items() if b is not None]


def _brute_force_ap(iou, p_size, gts, threshold):
  """The COCO rule written out: predictions ranked by size (ties by id), each
  takes the unmatched GT of highest IoU >= threshold; 101-point interpolated
  precision."""
  preds = sorted((p for p in range(1, len(p_size)) if p_size[p]),
                 key=lambda p: (-p_size[p], p))
  taken, hits = set(), []
  for p in preds:
    options = [(v, g) for (q, g), v in iou.items()
               if q == p and g not in taken and v >= threshold]
    if options:
      taken.add(max(options)[1])
    hits.append(bool(options))
  tp = np.cumsum(hits)
  fp = np.cumsum([not h for h in hits])
  recall = tp / len(gts)
  precision = tp / np.maximum(tp + fp, 1)
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  total = 0.0
  for r in np.linspace(0, 1, 101):
    k = np.flatnonzero(recall >= r - 1e-12)
    total += precision[k[0]] if len(k) else 0.0
  return total / 101


def _perturbations(labels, rng):
  ids = [i for i in np.unique(labels) if i]
  sizes = {i: int(np.sum(labels == i)) for i in ids}
  out = {}
  # eroded: a voxel stays only if its 6 neighbours carry its id
  same = np.ones(labels.shape, bool)
  for axis in range(3):
    for shift in (1, -1):
      same &= np.roll(labels, shift, axis) == labels
  out["eroded"] = np.where(same, labels, 0)
  # dilated into the background by one voxel (grey dilation keeps ids)
  grown = ndimage.grey_dilation(labels, size=(3, 3, 3))
  out["dilated"] = np.where(labels > 0, labels, grown)
  # the largest instance split in two at its median z
  big = max(ids, key=sizes.get)
  split = labels.copy()
  z = np.nonzero(labels == big)[0]
  cut = int(np.median(z))
  top = np.zeros_like(labels, bool)
  top[cut:] = True
  split[(labels == big) & top] = labels.max() + 1
  out["split"] = split
  # two instances merged into one id (the two largest)
  first, second = sorted(ids, key=sizes.get)[-2:]
  out["merged"] = np.where(labels == second, first, labels)
  # a fifth of the instances dropped
  dropped = rng.choice(ids, size=max(1, len(ids) // 5), replace=False)
  out["dropped"] = np.where(np.isin(labels, dropped), 0, labels)
  # everything at once, with ids shuffled
  mixed = np.where(np.isin(out["dilated"], dropped), 0, out["dilated"])
  mixed = np.where(labels == second, first, mixed)
  perm = np.concatenate([[0], rng.permutation(np.arange(1, int(mixed.max()) + 1)) + 100])
  out["mixed"] = perm[mixed]
  return out


@pytest.mark.parametrize("name", ["fib1-1-0-3", "fib1-3-3-0"])
def test_ap_against_perturbed_real_labels_equals_brute_force(urocell_volumes, name):
  labels = urocell_volumes[name].astype(np.int64)
  rng = np.random.default_rng(0)
  scores = {}
  for kind, pred in _perturbations(labels, rng).items():
    ours = average_precision(labels, pred)
    iou, p_size, gts = _pairwise_iou(labels, pred)
    for key, threshold in (("ap_50", 0.5), ("ap_75", 0.75)):
      reference = _brute_force_ap(iou, p_size, gts, threshold)
      assert ours[key] == pytest.approx(reference, abs=1e-9), (name, kind, key)
    scores[kind] = ours["ap_75"]
  # the perturbations do move the score, each its own way
  assert average_precision(labels, labels)["ap_75"] == 1.0
  assert scores["dropped"] < 0.85 and scores["split"] < 1.0 and scores["merged"] < 1.0
  # one voxel of dilation is enough to push these real shapes under IoU 0.75
  assert scores["dilated"] < 0.5


def test_morphology_volumes_are_voxel_counts_times_voxel_size(urocell_volumes):
  labels = urocell_volumes["fib1-3-2-1"]
  rows = morphology.measure_instances(labels, UROCELL_VOXEL_NM, block=(64, 128, 128))
  ids, counts = np.unique(labels[labels > 0], return_counts=True)
  assert [r["id"] for r in rows] == list(ids)
  voxel_um3 = np.prod(UROCELL_VOXEL_NM) / 1e9
  for row, count in zip(rows, counts):
    assert row["voxels"] == count
    assert row["volume_um3"] == pytest.approx(count * voxel_um3, rel=1e-12)
    assert row["surface_um2"] > 0 and row["elongation"] >= 1.0
  boxes = ndimage.find_objects(labels.astype(np.int32))
  for row in rows:
    box = boxes[row["id"] - 1]
    assert [row[f"bbox_{a}0"] for a in "zyx"] == [s.start for s in box]
    assert [row[f"bbox_{a}1"] for a in "zyx"] == [s.stop for s in box]
