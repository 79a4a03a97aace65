"""Rescaling 16-bit, signed or float EM images to the uint8 the model reads.

The model reads u / 255, so an image must be uint8 (`datasets.check_image`).
FIB-SEM and many ssTEM pipelines write 16-bit or float volumes; `--mode=convert
--intensity_range=...` maps them once, linearly, `low` -> 0 and `high` -> 255,
values beyond clipped. `auto` takes the range from percentiles of a sample
(`sample_range`): whole sections spread over z, subsampled in-plane, read one
at a time, so a terabyte volume costs a few dozen sections. The range is
printed so other volumes (training and inference data must share one mapping)
are converted with the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stt_jax.errors import UserError

# Percentiles of `auto`: a few bright or dark outliers (dust, a burnt spot,
# padding) must not squeeze the tissue's contrast into a few grey levels.
AUTO_PERCENTILES = (0.5, 99.5)


def parse_range(text: str) -> tuple[float, float] | None:
  """`--intensity_range`: 'auto' -> None (sample it), 'low,high' -> floats."""
  if text.strip().lower() == "auto":
    return None
  parts = text.split(",")
  try:
    low, high = (float(p) for p in parts)
  except ValueError:
    raise UserError(f"--intensity_range={text!r}: give 'auto' or two numbers "
                    "'low,high' (e.g. --intensity_range=1200,9800)") from None
  if not (math.isfinite(low) and math.isfinite(high) and high > low):
    raise UserError(f"--intensity_range={text!r}: need finite low < high")
  return low, high


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """`values` (any shape, any real dtype) -> uint8: low -> 0, high -> 255,
  linear between, clipped beyond, rounded to nearest; NaN -> 0."""
  out = np.asarray(values, np.float32) - np.float32(low)  # a new array: safe to edit
  out *= np.float32(255.0 / (high - low))
  np.rint(out, out=out)
  np.clip(out, 0.0, 255.0, out=out)
  out[np.isnan(out)] = 0.0
  return out.astype(np.uint8)


def sample_range(volume, *, percentiles: Sequence[float] = AUTO_PERCENTILES,
                 sections: int = 32, pixels_per_section: int = 1 << 19
                 ) -> tuple[tuple[float, float], str]:
  """(low, high) percentiles of `volume` [depth, height, width] from up to
  `sections` evenly spaced z-sections, each read whole (one at a time) and
  strided in-plane to about `pixels_per_section` pixels; NaNs ignored.
  Also returns a phrase saying what was sampled."""
  if len(volume.shape) != 3:
    raise UserError(f"{volume.path} has shape {tuple(volume.shape)}; only a 3D "
                    "image (z, y, x) can be rescaled to uint8")
  depth, height, width = volume.shape
  zs = np.unique(np.linspace(0, depth - 1, min(sections, depth)).round().astype(int))
  stride = max(1, math.ceil(math.sqrt(height * width / pixels_per_section)))
  sample = np.concatenate([
      volume.read([int(z), 0, 0], [1, height, width])[0, ::stride, ::stride]
      .astype(np.float64).ravel() for z in zs])
  sample = sample[np.isfinite(sample)]
  if sample.size == 0:
    raise UserError(f"{volume.path}: the sampled sections hold no finite value; "
                    "give --intensity_range=low,high")
  low, high = (float(v) for v in np.percentile(sample, percentiles))
  if not high > low:
    raise UserError(f"{volume.path}: the sampled sections are flat (percentiles "
                    f"{list(percentiles)} both {low:g}); give --intensity_range=low,high")
  what = (f"{percentiles[0]:g}th-{percentiles[1]:g}th percentile of {len(zs)} "
          f"section(s), one pixel in {stride} along y and x")
  return (low, high), what
