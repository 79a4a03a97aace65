import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.errors import UserError
from stt_jax.metrics import instance_ap, report, semantic


def test_volumes_on_disk_score_as_arrays_in_memory(tmp_path):
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 30, (10, 40, 36)).astype(np.uint32)
  pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 30, gt.shape)).astype(np.uint32)
  gt_vol = sources.write_array(str(tmp_path / "gt.zarr"), gt)
  pred_vol = sources.write_array(str(tmp_path / "pred.zarr"), pred)
  blocked = report.score_volumes(gt_vol, pred_vol, min_gt_size=0, block=(4, 16, 16))
  ap = instance_ap.average_precision(gt, pred)
  fg = semantic.foreground_scores(gt > 0, pred > 0)
  assert blocked["ap_75"] == pytest.approx(ap["ap_75"])
  assert blocked["ap_50_95"] == pytest.approx(ap["ap"])
  assert blocked["mcc"] == pytest.approx(fg["mcc"])
  assert blocked["num_pred"] == 29
  text = report.format_table(blocked, "t")
  assert "voxel MCC" in text and "AP-75" in text


def test_shape_mismatch_is_one_clear_error():
  with pytest.raises(UserError, match="differ in shape"):
    report.score_volumes(np.zeros((2, 3, 4), np.uint32), np.zeros((2, 3, 5), np.uint32),
                         min_gt_size=0)


def _random_pair(rng, shape, n):
  gt = np.zeros(shape, np.uint32)
  for i in range(1, n + 1):
    z, y, x = rng.integers(0, [shape[0] - 2, shape[1] - 6, shape[2] - 6])
    dz, dy, dx = rng.integers([1, 3, 3], [3, 7, 7])
    gt[z:z + dz, y:y + dy, x:x + dx] = i
  pred = np.roll(gt, int(rng.integers(-2, 3)), axis=2) * 3
  pred[rng.random(shape) < 0.05] = 0
  for i in range(40, 43):  # spurious boxes, some as large as real instances
    z, y, x = rng.integers(0, [shape[0] - 1, shape[1] - 4, shape[2] - 4])
    pred[z:z + 2, y:y + 4, x:x + 4] = i
  probabilities = np.where(gt > 0, rng.integers(90, 256, shape),
                           rng.integers(0, 160, shape)).astype(np.uint8)[..., None]
  return gt, pred, probabilities


@pytest.mark.parametrize("seed", range(3))
def test_a_volume_set_scores_as_its_volumes_side_by_side(seed):
  """Pooled AP equals a brute-force AP of the volumes laid side by side in z
  (zero-padded to one plane, ids made disjoint in volume order); Jaccard,
  Dice and the sweep equal numpy on all voxels; per_volume equals each
  volume scored alone."""
  from tests.metrics.test_instance_ap import _brute_force_ap
  rng = np.random.default_rng(seed)
  volumes = [_random_pair(rng, s, n) for s, n in (((6, 24, 24), 8), ((4, 30, 20), 5),
                                                  ((5, 16, 28), 6))]
  min_gt = int(rng.integers(0, 12))
  result = report.score_volume_set(volumes, min_gt_size=min_gt, block=(3, 16, 16))
  plane = (max(g.shape[1] for g, _, _ in volumes), max(g.shape[2] for g, _, _ in volumes))
  gts, preds, probs, gt_offset, pred_offset = [], [], [], 0, 0
  for g, p, m in volumes:
    pad = ((0, 0), (0, plane[0] - g.shape[1]), (0, plane[1] - g.shape[2]))
    gts.append(np.pad(np.where(g > 0, g + gt_offset, 0), pad))
    preds.append(np.pad(np.where(p > 0, p + pred_offset, 0), pad))
    probs.append(np.pad(m[..., 0], pad))  # padding: background predicted 0, no effect
    gt_offset, pred_offset = gt_offset + int(g.max()), pred_offset + int(p.max())
  gt, pred, prob = np.concatenate(gts), np.concatenate(preds), np.concatenate(probs)
  for t in (0.5, 0.75):
    assert result[f"ap_{int(t * 100)}"] == pytest.approx(
        _brute_force_ap(gt, pred, t, min_gt), abs=1e-12)
  inter, union = np.sum((gt > 0) & (pred > 0)), np.sum((gt > 0) | (pred > 0))
  assert result["jaccard"] == pytest.approx(inter / union, abs=1e-12)
  assert result["num_gt"] == sum(int(np.sum(gt == i) >= min_gt) for i in np.unique(gt) if i)
  assert result["num_pred"] == len(np.unique(pred)) - 1
  at = lambda t: prob > np.floor(t * 255)
  for t in ("0.50", "0.80"):
    hit = at(float(t))
    sweep_j = np.sum(hit & (gt > 0)) / np.sum(hit | (gt > 0))
    assert result["mask_threshold_sweep"][t]["jaccard"] == pytest.approx(sweep_j, abs=1e-12)
  # the object sweep: objects of mean mask level < t * 255 removed, in numpy
  ids = np.unique(pred[pred > 0])
  means = np.array([prob[pred == i].mean() for i in ids]) / 255
  cuts = [f"{t:.2f}" for t in (0.3, 0.35, 0.5, 0.55, 0.6, 0.65)]
  assert len({int((means < float(t)).sum()) for t in cuts}) >= 3  # the cuts differ
  for t in cuts:
    kept = np.where(np.isin(pred, ids[means < float(t)]), 0, pred)
    row = result["object_mean_mask_sweep"][t]
    inter, union = np.sum((gt > 0) & (kept > 0)), np.sum((gt > 0) | (kept > 0))
    assert row["jaccard"] == pytest.approx(inter / union, abs=1e-12), t
    assert row["num_pred"] == len(np.unique(kept)) - 1
    for iou in (0.5, 0.75):
      assert row[f"ap_{int(iou * 100)}"] == pytest.approx(
          _brute_force_ap(gt, kept, iou, min_gt), abs=1e-12)
  best = result["best_object_mean_mask"]
  assert result["best_object_mean_mask_jaccard"] == max(
      r["jaccard"] for r in result["object_mean_mask_sweep"].values())
  assert result["object_mean_mask_sweep"][f"{best:.2f}"]["jaccard"] == result[
      "best_object_mean_mask_jaccard"]
  row = result["object_mean_mask_sweep"][f"{best:.2f}"]
  assert row["jaccard"] > result["jaccard"]  # this draw's spurious boxes are unsure
  assert report.format_object_sweep(result, 0.0) == (
      f"objects of mean mask probability < s removed: best Jaccard {row['jaccard']:.4f} at "
      f"s = {best:.2f} ({row['num_pred']} instances, AP-75 {row['ap_75']:.4f}); "
      "decode.min_mean_mask is 0.00 (eval.json: object_mean_mask_sweep)")
  cut = dict(result, jaccard=row["jaccard"])  # as decoded with that cut
  assert report.format_object_sweep(cut, best).endswith(
      f"no cut above decode.min_mean_mask {best:.2f} raises the Jaccard "
      "(eval.json: object_mean_mask_sweep)")
  assert len(result["per_volume"]) == 3
  for alone, (g, p, _) in zip(result["per_volume"], volumes):
    for t in (0.5, 0.75):
      assert alone[f"ap_{int(t * 100)}"] == pytest.approx(
          _brute_force_ap(g, p, t, min_gt), abs=1e-12)
    assert alone["jaccard"] == pytest.approx(np.sum((g > 0) & (p > 0)) / np.sum((g > 0) | (p > 0)))
  # one volume: the plain scores, no per_volume
  assert "per_volume" not in report.score_volume_set(volumes[:1], min_gt_size=min_gt)
  text = report.format_volume_rows([dict(v, volume=f"v{i}", volume_shape=g.shape)
                                    for i, (v, (g, _, _)) in enumerate(
                                        zip(result["per_volume"], volumes))])
  assert text.count("\n") == 3 and "v2 (5, 16, 28)" in text


@pytest.mark.parametrize("seed", range(3))
def test_unlabelled_voxels_are_scored_around(seed):
  """data.unlabelled_id: voxel scores leave its voxels out; AP equals the
  brute-force AP after removing, in numpy, the unlabelled id from the ground
  truth and every prediction with over half its voxels on it."""
  from tests.metrics.test_instance_ap import _brute_force_ap
  rng = np.random.default_rng(seed)
  gt, pred, probabilities = _random_pair(rng, (6, 24, 24), 8)
  gt[:, :, 16:][gt[:, :, 16:] == 0] = 77        # unannotated strip
  for i in range(50, 54):                        # predictions inside it
    z, y, x = rng.integers(0, [5, 20, 16])
    pred[z:z + 2, y:y + 4, 17 + x % 5:21 + x % 5] = i
  result = report.score_volumes(gt, pred, min_gt_size=0, block=(3, 16, 16),
                                probabilities=probabilities, unlabelled_id=77)
  known = gt != 77
  inter = np.sum((gt > 0) & (pred > 0) & known)
  union = np.sum(((gt > 0) | (pred > 0)) & known)
  assert result["jaccard"] == pytest.approx(inter / union, abs=1e-12)
  kept = pred.copy()
  dropped = 0
  for i in np.unique(pred[pred > 0]):
    if 2 * np.sum((pred == i) & (gt == 77)) > np.sum(pred == i):
      kept[pred == i] = 0
      dropped += 1
  assert dropped >= 4
  truth = np.where(gt == 77, 0, gt)
  for t in (0.5, 0.75):
    assert result[f"ap_{int(t * 100)}"] == pytest.approx(_brute_force_ap(truth, kept, t),
                                                         abs=1e-12)
  assert result["num_pred"] == len(np.unique(kept)) - 1
  assert result["num_gt"] == len(np.unique(truth)) - 1
  hit = probabilities[..., 0] > np.floor(0.5 * 255)
  sweep_j = np.sum(hit & (gt > 0) & known) / np.sum((hit | (gt > 0)) & known)
  assert result["mask_threshold_sweep"]["0.50"]["jaccard"] == pytest.approx(sweep_j)
  # the object sweep: the mean over all of an object's voxels, the scores around
  mask = probabilities[..., 0].astype(float)
  for t in ("0.40", "0.55"):
    low = [i for i in np.unique(pred[pred > 0]) if mask[pred == i].mean() < float(t) * 255]
    assert low
    confident = np.where(np.isin(pred, low), 0, pred)
    inter = np.sum((gt > 0) & (confident > 0) & known)
    union = np.sum(((gt > 0) | (confident > 0)) & known)
    row = result["object_mean_mask_sweep"][t]
    assert row["jaccard"] == pytest.approx(inter / union, abs=1e-12)
    both = np.where(np.isin(kept, low), 0, kept)
    assert row["ap_75"] == pytest.approx(_brute_force_ap(truth, both, 0.75), abs=1e-12)


def test_object_sweep_of_a_region_takes_each_object_whole():
  """Validation with context scores a region of the decoded output; the
  decoder's cut saw each object whole, so the sweep's means come from the
  whole volume while its voxel scores stay in the region (numpy)."""
  rng = np.random.default_rng(3)
  gt, pred, probabilities = _random_pair(rng, (8, 24, 24), 10)
  pred[:4] = pred[4]                 # objects reach into the context half,
  mask = probabilities[..., 0].astype(float)
  mask[:4] = np.where(pred[:4] > 0, 250, mask[:4])  # sure of themselves there
  probabilities = mask.astype(np.uint8)[..., None]
  region = (slice(4, 8),)
  scored = [(gt[region], pred[region], probabilities[region], (pred, probabilities))]
  result = report.score_volume_set(scored, min_gt_size=0, block=(3, 16, 16))
  crop_only = report.score_volume_set([scored[0][:3]], min_gt_size=0, block=(3, 16, 16))
  ids = np.unique(pred[4:][pred[4:] > 0])
  whole_means = np.array([mask[pred == i].mean() for i in ids]) / 255
  crop_means = np.array([mask[4:][pred[4:] == i].mean() for i in ids]) / 255
  t = "0.60"
  assert (whole_means < 0.6).sum() != (crop_means < 0.6).sum()  # the two differ here
  g, p = gt[4:], pred[4:]
  for means, scores in ((whole_means, result), (crop_means, crop_only)):
    kept = np.where(np.isin(p, ids[means < 0.6]), 0, p)
    inter, union = np.sum((g > 0) & (kept > 0)), np.sum((g > 0) | (kept > 0))
    assert scores["object_mean_mask_sweep"][t]["jaccard"] == pytest.approx(inter / union)
    assert scores["object_mean_mask_sweep"][t]["num_pred"] == len(np.unique(kept)) - 1
  assert result["jaccard"] == crop_only["jaccard"]
