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
  _, confusion, _, tiles = report._tally(gt, a, (7, 128, 96), unlabelled_id=9)  # pylint: disable=protected-access
  assert list(tiles.matrix().sum(0)) == [confusion.tp, confusion.fp, confusion.fn]
  result = report.compare(gt, a, np.zeros_like(a), block=(7, 128, 96), unlabelled_id=9)
  tp = np.sum((gt > 0) & (gt != 9) & (a > 0) & known)
  union = np.sum((((gt > 0) & (gt != 9)) | (a > 0)) & known)
  assert result["jaccard_a"] == pytest.approx(tp / union)
  assert result["jaccard_b"] == 0.0 and result["a_higher"] == 1.0
