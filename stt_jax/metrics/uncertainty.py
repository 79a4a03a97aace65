"""How far a foreground Jaccard could move on other data like this: a tile
bootstrap.

A score on a held-out volume is one draw: VNC III's four test sections, or a
100-section MitoEM cube. Before calling 0.759 better than 0.753 one wants its
spread. The volume is cut into tiles (`TILE`, z, y, x voxels), each tile's
voxel confusion (TP, FP, FN) is kept, and tiles are drawn with replacement
(`RESAMPLES` times, a fixed seed): each draw's pooled Jaccard gives the
percentile 95 % interval. Comparing two segmentations of the same labels
draws the same tiles for both (paired), so the interval of the difference
and the share of draws where one is higher say whether a gap is real.

Tiles are treated as independent. Neighbouring tiles share mitochondria and
staining, so the intervals understate the spread across *other* volumes;
they say how much this volume's own content supports a number.

AP's units are not tiles (an instance crosses them) but groups of instances:
the connected components of the overlap graph (ground-truth instances and
predictions, linked where they share a voxel; a prediction touching nothing
is a group of its own, a false positive). Matching never crosses groups, so
each prediction's TP/FP flag at a threshold is fixed by its group, and a
draw of groups with replacement re-weights the ranked predictions (each
copy kept in its rank place) and the ground-truth count: the AP-50/AP-75
intervals of a cluster bootstrap. With two segmentations the groups are
those of the graph over both, drawn together (paired).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from stt_jax.metrics import instance_ap

TILE = (16, 256, 256)  # (z, y, x) voxels: a few mitochondria in-plane
RESAMPLES = 2000
SEED = 0
MIN_TILES = 8  # fewer tiles have too few distinct draws to place percentiles


class TileConfusion:
  """TP, FP, FN of each tile of `TILE` voxels, added block by block."""

  def __init__(self, tile: Sequence[int] = TILE):
    self.tile = tuple(int(t) for t in tile)
    self.counts: dict[tuple, np.ndarray] = {}

  def add(self, gt_foreground: np.ndarray, pred_foreground: np.ndarray,
          origin: Sequence[int], valid: np.ndarray | None = None) -> None:
    """A block whose voxel 0 lies at `origin` of the volume, counting only
    voxels where `valid` (None: all; partly annotated labels)."""
    gt, pred = np.asarray(gt_foreground, bool), np.asarray(pred_foreground, bool)
    if valid is not None:
      gt, pred = gt & valid, pred & valid
    tp, fp, fn = gt & pred, pred & ~gt, gt & ~pred
    # tile boundaries inside the block, in block coordinates
    cuts = [sorted({0, n} | {t * k - o for k in range(o // t + 1, (o + n) // t + 1)
                            if 0 < t * k - o < n})
            for o, n, t in zip(origin, gt.shape, self.tile)]
    for z0, z1 in zip(cuts[0], cuts[0][1:]):
      for y0, y1 in zip(cuts[1], cuts[1][1:]):
        for x0, x1 in zip(cuts[2], cuts[2][1:]):
          box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
          index = tuple((o + a) // t for o, a, t in zip(origin, (z0, y0, x0), self.tile))
          counts = np.array([np.count_nonzero(m[box]) for m in (tp, fp, fn)], np.int64)
          self.counts[index] = self.counts.get(index, 0) + counts

  def merge(self, other: "TileConfusion", key) -> None:
    """Another volume's tiles, told apart by `key` (a tuple)."""
    for index, counts in other.counts.items():
      self.counts[key + index] = self.counts.get(key + index, 0) + counts

  def matrix(self, order: Sequence[tuple] | None = None) -> np.ndarray:
    """[tiles, 3] (TP, FP, FN) in `order` (default: sorted tile keys)."""
    order = sorted(self.counts) if order is None else order
    return np.stack([self.counts.get(k, np.zeros(3, np.int64)) for k in order]) \
        if order else np.zeros((0, 3), np.int64)


def _jaccard(tp, fp, fn):
  union = tp + fp + fn
  return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
  """[resamples, n] how often each tile is drawn (n draws with replacement)."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def jaccard_interval(tiles: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict:
  """{"jaccard_ci95", "dice_ci95": [low, high], "ci_tiles"} from [tiles, 3]
  counts; None intervals with fewer than MIN_TILES tiles."""
  n = len(tiles)
  if n < MIN_TILES:
    return {"jaccard_ci95": None, "dice_ci95": None, "ci_tiles": n}
  sums = _draws(n, resamples, seed) @ tiles.astype(np.float64)  # [resamples, 3]
  jaccard = _jaccard(*sums.T)
  low, high = (float(v) for v in np.percentile(jaccard, [2.5, 97.5]))
  dice = lambda j: 2 * j / (1 + j)  # monotone: Dice's interval maps over
  return {"jaccard_ci95": [low, high], "dice_ci95": [dice(low), dice(high)], "ci_tiles": n}


def paired_difference(tiles_a: np.ndarray, tiles_b: np.ndarray,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict:
  """Jaccard of A minus B with both scored on the same drawn tiles:
  {"jaccard_a", "jaccard_b", "difference", "difference_ci95", "a_higher"
  (share of draws where A's Jaccard is higher), "ci_tiles"}."""
  if tiles_a.shape != tiles_b.shape:
    raise ValueError(f"tile counts differ: {tiles_a.shape} vs {tiles_b.shape}")
  n = len(tiles_a)
  whole_a, whole_b = (float(_jaccard(*t.sum(0))) for t in (tiles_a, tiles_b))
  out = {"jaccard_a": whole_a, "jaccard_b": whole_b, "difference": whole_a - whole_b,
         "ci_tiles": n}
  if n < MIN_TILES:
    return dict(out, difference_ci95=None, a_higher=None)
  draws = _draws(n, resamples, seed)
  diff = (_jaccard(*(draws @ tiles_a.astype(np.float64)).T)
          - _jaccard(*(draws @ tiles_b.astype(np.float64)).T))
  low, high = (float(v) for v in np.percentile(diff, [2.5, 97.5]))
  return dict(out, difference_ci95=[low, high], a_higher=float(np.mean(diff > 0)))


AP_THRESHOLDS = (0.5, 0.75)
MIN_GROUPS = 8  # as MIN_TILES


def instance_groups(num_gt: int, segmentations: Sequence[tuple[int, np.ndarray, np.ndarray]],
                    between: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[int, np.ndarray, list[np.ndarray]]:
  """Connected components of the overlap graph over `num_gt` ground-truth
  instances and the predictions of each segmentation, given as (number of
  predictions, gt index of each overlapping pair, prediction index of each
  pair); `between`: (index in the first, index in the second) of
  overlapping predictions of two segmentations. Returns (number of groups,
  group of each gt, [group of each prediction, per segmentation])."""
  sizes = [num_gt] + [int(n) for n, _, _ in segmentations]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  rows = [np.asarray(g, np.int64) for _, g, _ in segmentations]
  cols = [np.asarray(p, np.int64) + start for (_, _, p), start in zip(segmentations, starts[1:])]
  if between is not None:
    rows.append(np.asarray(between[0], np.int64) + starts[1])
    cols.append(np.asarray(between[1], np.int64) + starts[2])
  rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
  cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
  n = int(starts[-1])
  graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
  count, label = csgraph.connected_components(graph, directed=False)
  return int(count), label[:num_gt], [label[a:b] for a, b in zip(starts[1:-1], starts[2:])]


def _rank_of(ids_sorted: np.ndarray, ranked: np.ndarray, query: np.ndarray) -> np.ndarray:
  """Index in `ranked` (a permutation of the sorted `ids_sorted`) of each id
  in `query`."""
  position = np.empty(len(ranked), np.int64)
  position[np.searchsorted(ids_sorted, ranked)] = np.arange(len(ranked))
  return position[np.searchsorted(ids_sorted, query)]


def _matched(counts, min_gt_size: int):
  """(`instance_ap.matches` at AP_THRESHOLDS, (number of predictions, gt
  rank index and prediction rank index of each overlapping pair))."""
  m = instance_ap.matches(counts, min_gt_size=min_gt_size, thresholds=AP_THRESHOLDS)
  gt_ids, _, pred_ids, _, pair_gt, pair_pred, _ = counts
  return m, (len(pred_ids), _rank_of(gt_ids, m["gt_ids"], pair_gt),
             _rank_of(pred_ids, m["pred_ids"], pair_pred))


def _draw_aps(m, group_of_pred, gt_per_group, draws) -> dict:
  """[draws] AP at each threshold of one segmentation over the drawn groups."""
  out = {}
  for t in AP_THRESHOLDS:
    is_tp, is_ignored = m["flags"][t]
    out[t] = np.array([instance_ap.ap_from_flags(is_tp, is_ignored, float(d @ gt_per_group),
                                                 d[group_of_pred]) for d in draws])
  return out


def _key(t: float) -> str:
  return f"ap_{int(round(t * 100))}"


def ap_intervals(counts, *, min_gt_size: int, resamples: int = RESAMPLES,
                 seed: int = SEED) -> dict:
  """{"ap_50_ci95", "ap_75_ci95": [low, high] or None, "ci_groups"} from
  `OverlapCounter.counts()` (unlabelled already set aside); None with fewer
  than MIN_GROUPS groups."""
  m, pairs = _matched(counts, min_gt_size)
  groups, gt_group, (pred_group,) = instance_groups(len(m["gt_ids"]), [pairs])
  out = {"ci_groups": groups}
  if groups < MIN_GROUPS or not np.any(~m["gt_ignored"]):
    return dict(out, **{f"{_key(t)}_ci95": None for t in AP_THRESHOLDS})
  gt_per_group = np.bincount(gt_group[~m["gt_ignored"]], minlength=groups).astype(np.float64)
  aps = _draw_aps(m, pred_group, gt_per_group, _draws(groups, resamples, seed))
  for t in AP_THRESHOLDS:
    low, high = (float(v) for v in np.nanpercentile(aps[t], [2.5, 97.5]))
    out[f"{_key(t)}_ci95"] = [low, high]
  return out


def paired_ap_difference(counts_a, counts_b, counts_ab, *, min_gt_size: int,
                         resamples: int = RESAMPLES, seed: int = SEED) -> dict:
  """AP-50 and AP-75 of A minus B (both against the same labels) over the
  same drawn groups of the overlap graph of the labels and both
  segmentations (`counts_ab`: `OverlapCounter.counts()` of A against B, so
  that a false positive both make at one place is one group):
  {"ap_50_a", "ap_50_b", "ap_50_difference", "ap_50_difference_ci95",
  "ap_50_a_higher", "ap_50_equal", ... , "ci_groups"}."""
  (ma, pa), (mb, pb) = _matched(counts_a, min_gt_size), _matched(counts_b, min_gt_size)
  if not np.array_equal(ma["gt_ids"], mb["gt_ids"]):
    raise ValueError("the two segmentations were scored against different labels")
  between = (_rank_of(counts_a[2], ma["pred_ids"], counts_ab[4]),
             _rank_of(counts_b[2], mb["pred_ids"], counts_ab[5]))
  groups, gt_group, (group_a, group_b) = instance_groups(len(ma["gt_ids"]), [pa, pb],
                                                         between)
  num_gt = float(np.count_nonzero(~ma["gt_ignored"]))
  out = {"ci_groups": groups}
  for t in AP_THRESHOLDS:
    a, b = (instance_ap.ap_from_flags(*m["flags"][t], num_gt) for m in (ma, mb))
    out.update({f"{_key(t)}_a": a, f"{_key(t)}_b": b, f"{_key(t)}_difference": a - b})
  if groups < MIN_GROUPS or num_gt == 0:
    return dict(out, **{f"{_key(t)}_{k}": None for t in AP_THRESHOLDS
                        for k in ("difference_ci95", "a_higher", "equal")})
  gt_per_group = np.bincount(gt_group[~ma["gt_ignored"]], minlength=groups).astype(np.float64)
  draws = _draws(groups, resamples, seed)
  aps_a = _draw_aps(ma, group_a, gt_per_group, draws)
  aps_b = _draw_aps(mb, group_b, gt_per_group, draws)
  for t in AP_THRESHOLDS:
    diff = aps_a[t] - aps_b[t]
    low, high = (float(v) for v in np.nanpercentile(diff, [2.5, 97.5]))
    out[f"{_key(t)}_difference_ci95"] = [low, high]
    finite = diff[np.isfinite(diff)]
    out[f"{_key(t)}_a_higher"] = float(np.mean(finite > 0))
    out[f"{_key(t)}_equal"] = float(np.mean(finite == 0))
  return out


def format_interval(scores: dict) -> str | None:
  """One line for the score table, or None without an interval."""
  lines = []
  ci = scores.get("jaccard_ci95")
  if ci:
    lines.append(f"foreground Jaccard 95% interval {ci[0]:.4f}-{ci[1]:.4f} (tile bootstrap: "
                 f"{scores['ci_tiles']} tiles of {'x'.join(map(str, TILE))}, "
                 f"{RESAMPLES} draws)")
  ap50, ap75 = scores.get("ap_50_ci95"), scores.get("ap_75_ci95")
  if ap50 and ap75:
    lines.append(f"AP-50 95% interval {ap50[0]:.4f}-{ap50[1]:.4f}, AP-75 {ap75[0]:.4f}-"
                 f"{ap75[1]:.4f} (bootstrap of {scores['ci_groups']} groups of "
                 f"overlapping instances, {RESAMPLES} draws)")
  return "\n".join(lines) or None


def format_ap_difference(result: dict, name_a: str, name_b: str) -> str:
  """One line per AP threshold of `paired_ap_difference`."""
  lines = []
  for t in AP_THRESHOLDS:
    k = _key(t)
    d, ci = result[f"{k}_difference"], result[f"{k}_difference_ci95"]
    name = f"AP-{int(round(t * 100))} {name_a} - {name_b}: {d:+.4f}"
    if ci is None:
      lines.append(f"{name} ({result['ci_groups']} instance groups: too few for an interval)")
      continue
    lines.append(f"{name}, 95% interval {ci[0]:+.4f} to {ci[1]:+.4f}; {name_a} higher in "
                 f"{100 * result[f'{k}_a_higher']:.1f}% and equal in "
                 f"{100 * result[f'{k}_equal']:.1f}% of {RESAMPLES} paired draws of "
                 f"{result['ci_groups']} instance groups"
                 + ("" if ci[0] > 0 or ci[1] < 0 else ": the interval holds 0"))
  return "\n".join(lines)


def format_difference(result: dict, name_a: str, name_b: str) -> str:
  d = result["difference"]
  if result["difference_ci95"] is None:
    return (f"Jaccard {name_a} - {name_b}: {d:+.4f} ({result['ci_tiles']} tiles of "
            f"{'x'.join(map(str, TILE))}: too few for an interval)")
  low, high = result["difference_ci95"]
  return (f"Jaccard {name_a} - {name_b}: {d:+.4f}, 95% interval {low:+.4f} to {high:+.4f}; "
          f"{name_a} higher in {100 * result['a_higher']:.1f}% of {RESAMPLES} paired tile "
          f"draws ({result['ci_tiles']} tiles)"
          + ("" if low > 0 or high < 0 else ": the interval holds 0, no clear winner"))

