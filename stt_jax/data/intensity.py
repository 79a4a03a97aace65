"""Rescaling 16-bit, signed or float EM images to the uint8 the model reads.

The model reads u / 255, so an image must be uint8 (`datasets.check_image`).
FIB-SEM and many ssTEM pipelines write 16-bit or float volumes; `--mode=convert
--intensity_range=...` maps them once, linearly, `low` -> 0 and `high` -> 255,
values beyond clipped. `auto` takes the range from percentiles of a sample
(`sample_range`): 64 in-plane boxes of 512^2 pixels at sections spread over
z, so a terabyte volume costs under a gigabyte of reads. The range is
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
                 boxes: int = 64, box_size: int = 512, seed: int = 0
                 ) -> tuple[tuple[float, float], str]:
  """(low, high) percentiles of `volume` [depth, height, width] over `boxes`
  single-section boxes of up to box_size x box_size pixels, at sections spread
  evenly over z and random in-plane places; NaNs ignored. Also returns a
  phrase saying what was sampled.

  Boxes, not whole sections: a chunked volume reads every chunk a box
  touches, the chunk's full depth (16 sections in ours), so 64 sections of a
  4096^2 volume would read 1,024 sections' worth, while 64 boxes of 512^2
  read 1/64 of that. Where a box is a whole section, each section is read
  once, so a small volume's sample is all of it."""
  if len(volume.shape) != 3:
    raise UserError(f"{volume.path} has shape {tuple(volume.shape)}; only a 3D "
                    "image (z, y, x) can be rescaled to uint8")
  depth, height, width = volume.shape
  box = (1, min(box_size, height), min(box_size, width))
  zs = np.linspace(0, depth - 1, boxes).round().astype(int)
  if box[1:] == (height, width):
    zs = np.unique(zs)
  rng = np.random.default_rng(seed)
  starts = [(int(z), int(rng.integers(0, height - box[1] + 1)),
             int(rng.integers(0, width - box[2] + 1))) for z in zs]
  reads = [volume.read_async(start, box) for start in starts]  # all issued, then awaited
  sample = np.concatenate([np.asarray(r.result()).ravel() for r in reads])
  if sample.dtype.kind == "f":
    sample = sample[np.isfinite(sample)]
  if sample.size == 0:
    raise UserError(f"{volume.path}: the sampled sections hold no finite value; "
                    "give --intensity_range=low,high")
  low, high = (float(v) for v in np.percentile(sample, percentiles))
  if not high > low:
    raise UserError(f"{volume.path}: the sampled sections are flat (percentiles "
                    f"{list(percentiles)} both {low:g}); give --intensity_range=low,high")
  what = (f"{percentiles[0]:g}th-{percentiles[1]:g}th percentile of {len(starts)} "
          f"boxes of {box[1]}x{box[2]} pixels over {len(set(zs.tolist()))} section(s)")
  return (low, high), what
