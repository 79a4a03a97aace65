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
they say how much this volume's own content supports a number. AP has no
interval here: an instance crosses tiles, so tiles are not its units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def format_interval(scores: dict) -> str | None:
  """One line for the score table, or None without an interval."""
  ci = scores.get("jaccard_ci95")
  if not ci:
    return None
  return (f"foreground Jaccard 95% interval {ci[0]:.4f}-{ci[1]:.4f} (tile bootstrap: "
          f"{scores['ci_tiles']} tiles of {'x'.join(map(str, TILE))}, {RESAMPLES} draws)")


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

