"""Tile bootstrap: tile counts against numpy, intervals that cover the truth
about 95 % of the time on simulated data, paired differences."""

import numpy as np
import pytest

from stt_jax.metrics import report, uncertainty


def _tile_reference(gt, pred, tile, valid=None):
  """{tile index: (TP, FP, FN)} straight from the whole volume."""
  valid = np.ones(gt.shape, bool) if valid is None else valid
  out = {}
  for index in np.ndindex(*[-(-n // t) for n, t in zip(gt.shape, tile)]):
    box = tuple(slice(i * t, (i + 1) * t) for i, t in zip(index, tile))
    g, p, v = gt[box], pred[box], valid[box]
    out[index] = [np.sum(g & p & v), np.sum(p & ~g & v), np.sum(g & ~p & v)]
  return out


def test_tile_counts_from_blocks_off_the_tile_grid_equal_numpy():
  rng = np.random.default_rng(0)
  gt, pred = rng.random((11, 23, 30)) < 0.3, rng.random((11, 23, 30)) < 0.4
  valid = rng.random(gt.shape) < 0.9
  tiles = uncertainty.TileConfusion(tile=(4, 6, 8))
  for z in range(0, 11, 5):  # blocks of 5 x 7 x 9: cut across tiles
    for y in range(0, 23, 7):
      for x in range(0, 30, 9):
        box = (slice(z, z + 5), slice(y, y + 7), slice(x, x + 9))
        tiles.add(gt[box], pred[box], (z, y, x), valid=valid[box])
  reference = _tile_reference(gt, pred, (4, 6, 8), valid)
  assert set(tiles.counts) == set(reference)
  for index, counts in reference.items():
    assert list(tiles.counts[index]) == counts, index


def _simulated_tiles(rng, n):
  """Tiles drawn from a fixed population: each tile's foreground size and
  its error rates vary, so the pooled Jaccard has a true value to cover."""
  size = rng.gamma(2.0, 500.0, n)
  tp = rng.binomial(size.astype(int), rng.beta(8, 2, n))
  fp = rng.poisson(0.15 * size * rng.beta(2, 5, n) * 2)
  return np.stack([tp, fp, size.astype(int) - tp], 1)


def test_intervals_cover_the_population_jaccard_about_95_percent_of_the_time():
  rng = np.random.default_rng(1)
  population = _simulated_tiles(rng, 200000)
  truth = population[:, 0].sum() / population.sum()
  trials, covered = 200, 0
  for trial in range(trials):
    sample = population[rng.integers(0, len(population), 60)]
    low, high = uncertainty.jaccard_interval(sample, resamples=400, seed=trial)["jaccard_ci95"]
    covered += low <= truth <= high
  # a percentile bootstrap of 60 tiles: close to nominal, a little under
  assert 0.88 <= covered / trials <= 0.99, covered


def test_interval_holds_the_score_collapses_on_equal_tiles_and_needs_two_tiles():
  rng = np.random.default_rng(2)
  tiles = _simulated_tiles(rng, 30)
  result = uncertainty.jaccard_interval(tiles)
  whole = tiles[:, 0].sum() / tiles.sum()
  low, high = result["jaccard_ci95"]
  assert low < whole < high and result["ci_tiles"] == 30
  assert result["dice_ci95"] == pytest.approx([2 * low / (1 + low), 2 * high / (1 + high)])
  assert uncertainty.jaccard_interval(tiles) == result  # a fixed seed
  same = np.tile([[30, 10, 10]], (12, 1))
  assert uncertainty.jaccard_interval(same)["jaccard_ci95"] == pytest.approx([0.6, 0.6])
  assert uncertainty.jaccard_interval(same[:7])["jaccard_ci95"] is None  # too few tiles
  assert uncertainty.jaccard_interval(same[:8])["jaccard_ci95"] is not None


def test_paired_difference_sees_a_small_consistent_gain_an_unpaired_view_would_miss():
  rng = np.random.default_rng(3)
  b = _simulated_tiles(rng, 40)
  a = b.copy()
  gain = np.minimum(b[:, 2], 5)  # A finds up to 5 more voxels on every tile
  a[:, 0] += gain
  a[:, 2] -= gain
  paired = uncertainty.paired_difference(a, b)
  assert paired["difference"] > 0 and paired["a_higher"] == 1.0
  assert paired["difference_ci95"][0] > 0
  # the two intervals on their own overlap: only pairing shows the gain
  ci_a = uncertainty.jaccard_interval(a)["jaccard_ci95"]
  ci_b = uncertainty.jaccard_interval(b)["jaccard_ci95"]
  assert ci_a[0] < ci_b[1]
  same = uncertainty.paired_difference(b, b)
  assert same["difference"] == 0 and same["difference_ci95"] == [0.0, 0.0]
  assert same["a_higher"] == 0.0
  assert "no clear winner" in uncertainty.format_difference(same, "a", "b")


def test_report_tiles_pool_to_the_voxel_counts_and_compare_pairs_them():
  rng = np.random.default_rng(4)
  gt = (rng.random((20, 300, 280)) < 0.2).astype(np.uint32)
  gt[:, :40][gt[:, :40] == 0] = 9  # an unannotated band
  a = (rng.random(gt.shape) < 0.25).astype(np.uint32)
  scores = report.score_volumes(gt, a, min_gt_size=0, block=(7, 128, 96), unlabelled_id=9)
  assert scores["ci_tiles"] == 2 * 2 * 2
  low, high = scores["jaccard_ci95"]
  assert low <= scores["jaccard"] <= high
  known = gt != 9
  _, confusion, _, tiles, _ = report._tally(gt, a, (7, 128, 96), unlabelled_id=9)  # pylint: disable=protected-access
  assert list(tiles.matrix().sum(0)) == [confusion.tp, confusion.fp, confusion.fn]
  result = report.compare(gt, a, np.zeros_like(a), block=(7, 128, 96), unlabelled_id=9)
  tp = np.sum((gt > 0) & (gt != 9) & (a > 0) & known)
  union = np.sum((((gt > 0) & (gt != 9)) | (a > 0)) & known)
  assert result["jaccard_a"] == pytest.approx(tp / union)
  assert result["jaccard_b"] == 0.0 and result["a_higher"] == 1.0


# ---- AP: bootstrap over groups of overlapping instances ----

from stt_jax.metrics import instance_ap  # noqa: E402


def _groups_reference(num_gt, segmentations, between):
  """Union-find over 'g<i>' and 's<k>p<j>' nodes: a partition as frozensets."""
  parent = {}
  def find(x):
    parent.setdefault(x, x)
    while parent[x] != x:
      x = parent[x]
    return x
  for i in range(num_gt):
    find(f"g{i}")
  for k, (n, gs, ps) in enumerate(segmentations):
    for j in range(n):
      find(f"s{k}p{j}")
    for g, p in zip(gs, ps):
      parent[find(f"g{g}")] = find(f"s{k}p{p}")
  for a, b in zip(*between):
    parent[find(f"s0p{a}")] = find(f"s1p{b}")
  classes = {}
  for x in list(parent):
    classes.setdefault(find(x), set()).add(x)
  return {frozenset(c) for c in classes.values()}


def test_instance_groups_are_the_overlap_graphs_components():
  rng = np.random.default_rng(3)
  segs = [(12, rng.integers(0, 20, 9), rng.integers(0, 12, 9)),
          (7, rng.integers(0, 20, 5), rng.integers(0, 7, 5))]
  between = (rng.integers(0, 12, 4), rng.integers(0, 7, 4))
  count, gt_group, pred_groups = uncertainty.instance_groups(20, segs, between)
  ours = {}
  for i, g in enumerate(gt_group):
    ours.setdefault(g, set()).add(f"g{i}")
  for k, groups in enumerate(pred_groups):
    for j, g in enumerate(groups):
      ours.setdefault(g, set()).add(f"s{k}p{j}")
  assert {frozenset(c) for c in ours.values()} == _groups_reference(20, segs, between)
  assert count == len(ours)


def _synthetic_counts(rng, units, detect=0.8, false_positive=0.25, first_id=1):
  """`OverlapCounter.counts()` of `units` ground-truth instances (sizes 200),
  each found with probability `detect` by a prediction (150-250 voxels) at
  an IoU spread over 0.3-1, plus unmatched predictions; up to 50 units the
  prediction sizes are distinct, so ranks have no ties."""
  gt_ids, gt_sizes, pred_ids, pred_sizes, pg, pp, pc = ([] for _ in range(7))
  sizes = iter(rng.permutation(np.arange(150, 251)) if units <= 50
               else rng.integers(150, 251, 2 * units))
  next_pred = first_id
  for u in range(units):
    gid = first_id + u
    gt_ids.append(gid)
    gt_sizes.append(200)
    if rng.random() < detect:
      size, iou = next(sizes), rng.uniform(0.3, 1.0)
      overlap = int(round(iou * (200 + size) / (1 + iou)))
      overlap = min(overlap, 200, size)
      pred_ids.append(next_pred)
      pred_sizes.append(size)
      pg.append(gid)
      pp.append(next_pred)
      pc.append(overlap)
      next_pred += 1
    if rng.random() < false_positive:
      pred_ids.append(next_pred)
      pred_sizes.append(next(sizes))
      next_pred += 1
  u64 = lambda v: np.asarray(v, np.uint64)
  i64 = lambda v: np.asarray(v, np.int64)
  return (u64(gt_ids), i64(gt_sizes), u64(pred_ids), i64(pred_sizes), u64(pg), u64(pp),
          i64(pc))


def test_weighted_ap_equals_ap_of_the_copies():
  """A weight of 2 on every prediction (and twice the ground truth) is the
  AP of the counts laid twice side by side; weight 1 is plain AP."""
  rng = np.random.default_rng(7)
  counts = _synthetic_counts(rng, 40)
  m = instance_ap.matches(counts, thresholds=(0.5, 0.75))
  num_gt = len(counts[0])
  doubled = instance_ap.ap_from_counts(instance_ap.pool_counts([counts, counts]),
                                       thresholds=(0.5, 0.75))
  plain = instance_ap.ap_from_counts(counts, thresholds=(0.5, 0.75))
  for t, key in ((0.5, "ap_50"), (0.75, "ap_75")):
    flags = m["flags"][t]
    assert instance_ap.ap_from_flags(*flags, num_gt) == plain[key]
    weights = np.full(len(flags[0]), 2.0)
    assert instance_ap.ap_from_flags(*flags, 2 * num_gt, weights) == pytest.approx(
        doubled[key], abs=1e-12)


def test_ap_intervals_cover_the_population_about_95_percent():
  """Samples of 60 instances from one population: the AP-50 interval covers
  the AP of a 20,000-instance sample most of the time."""
  rng = np.random.default_rng(11)
  truth = instance_ap.ap_from_counts(_synthetic_counts(rng, 20000), thresholds=(0.5,))["ap_50"]
  covered = []
  for _ in range(120):
    counts = _synthetic_counts(rng, 60)
    ci = uncertainty.ap_intervals(counts, min_gt_size=0, resamples=400,
                                  seed=int(rng.integers(1 << 30)))["ap_50_ci95"]
    covered.append(ci[0] <= truth <= ci[1])
  assert 0.85 <= np.mean(covered) <= 0.995, (np.mean(covered), truth)


def test_ap_intervals_need_enough_groups_and_pair_identical_runs_at_zero():
  rng = np.random.default_rng(5)
  few = uncertainty.ap_intervals(_synthetic_counts(rng, 4, false_positive=0), min_gt_size=0)
  assert few["ap_50_ci95"] is None and few["ci_groups"] == 4
  counts = _synthetic_counts(rng, 30)
  pred_ids, pred_sizes = counts[2], counts[3]
  a_vs_b = (pred_ids, pred_sizes, pred_ids, pred_sizes, pred_ids, pred_ids, pred_sizes)
  same = uncertainty.paired_ap_difference(counts, counts, a_vs_b, min_gt_size=0,
                                          resamples=200)
  assert same["ap_50_difference"] == 0 and same["ap_50_difference_ci95"] == [0.0, 0.0]
  assert same["ap_50_equal"] == 1.0
  gt_ids, gt_sizes = counts[0], counts[1]
  perfect = (gt_ids, gt_sizes, gt_ids, gt_sizes, gt_ids, gt_ids, gt_sizes)
  gt_of = dict(zip(counts[5].tolist(), counts[4].tolist()))  # B's prediction -> its gt
  b_ids = np.asarray(sorted(gt_of), np.uint64)
  a_vs_b = (gt_ids, gt_sizes, pred_ids, pred_sizes,
            np.asarray([gt_of[int(i)] for i in b_ids], np.uint64), b_ids,
            np.ones(len(b_ids), np.int64))
  better = uncertainty.paired_ap_difference(perfect, counts, a_vs_b, min_gt_size=0,
                                            resamples=200)
  assert better["ap_75_a"] == 1.0 and better["ap_75_a_higher"] == 1.0
  assert better["ap_75_difference_ci95"][0] > 0
  text = uncertainty.format_ap_difference(better, "A", "B")
  assert "AP-75 A - B: +" in text and "A higher in 100.0%" in text


def test_scores_carry_ap_intervals_from_volumes():
  """score_volumes on label volumes: intervals around AP from the groups."""
  rng = np.random.default_rng(2)
  gt = np.zeros((8, 64, 64), np.uint32)
  pred = np.zeros_like(gt)
  k = 0
  for z in range(0, 8, 4):
    for y in range(0, 64, 16):
      for x in range(0, 64, 16):
        k += 1
        gt[z:z + 3, y:y + 10, x:x + 10] = k
        if rng.random() < 0.8:  # found, shifted a little
          dy = int(rng.integers(0, 4))
          pred[z:z + 3, y + dy:y + 10 + dy, x:x + 10] = k
  scores = report.score_volumes(gt, pred, min_gt_size=0)
  assert scores["ci_groups"] == 32
  for key in ("ap_50", "ap_75"):
    low, high = scores[f"{key}_ci95"]
    assert 0 <= low <= high <= 1
  assert "AP-50 95% interval" in uncertainty.format_interval(scores)
