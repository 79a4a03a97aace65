"""Probabilities as the uint8 values the pipeline stores (p = u / 255).

One rule for every consumer of stored probabilities (the decoder, blockwise
seeding checks, the threshold sweep of `metrics.semantic`): `p > t` is
`u > level(t)` with level(t) = floor(255 t), so a threshold means the same
voxels whether it is applied to floats, to a whole volume or block by block.
"""

from __future__ import annotations

import numpy as np


def as_uint8(probabilities: np.ndarray) -> np.ndarray:
  """[...] float probabilities in [0, 1] -> [...] uint8 round(255 p); uint8 passes."""
  if probabilities.dtype == np.uint8:
    return probabilities
  return np.clip(np.round(np.asarray(probabilities) * 255.0), 0, 255).astype(np.uint8)


def level(threshold: float) -> int:
  """The uint8 level u with (u' / 255 > threshold) == (u' > u)."""
  return int(np.floor(float(threshold) * 255.0))
