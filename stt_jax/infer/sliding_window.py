"""Sliding-window inference with Gaussian blending over a chunked volume.

Windows overlap by `overlap` (a fraction per axis); each window's prediction
is weighted by 1e-4 + exp(-r^2 / (2 * 0.2^2)), r the distance from the window
centre in coordinates normalised to [-1, 1]^3 (the original's blending), so
seams between windows vanish. Windows are batched and split over all devices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from stt_jax.data.sources import Volume


def blending_weights(window: Sequence[int], sigma: float = 0.2) -> np.ndarray:
  """[depth, height, width] float32 weights, largest at the window centre."""
  axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in window]
  grid = np.meshgrid(*axes, indexing="ij")
  r2 = sum(g ** 2 for g in grid)
  return (1e-4 + np.exp(-r2 / (2 * sigma ** 2))).astype(np.float32)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start offsets covering [0, size) with windows of `window` (the last one
  flush with the end). A volume smaller than the window gets one start, 0."""
  if size <= window:
    return [0]
  stride = max(int(round(window * (1.0 - overlap))), 1)
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def read_window(volume: Volume, start: Sequence[int], window: Sequence[int]):
  """Reads a window, edge-padding where the volume is smaller than it."""
  size = [min(w, s - st) for w, s, st in zip(window, volume.shape, start)]
  data = volume.read(start, size)
  pads = [(0, w - n) for w, n in zip(window, size)]
  return np.pad(data, pads, mode="edge") if any(p[1] for p in pads) else data


def _batches(items: list, size: int) -> Iterator[list]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def make_predict_fn(model, mesh) -> Callable:
  """Jitted params, image [b, d, h, w, 1] -> probabilities [b, d, h, w, 2]."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  fn = lambda params, x: jax.nn.sigmoid(model.apply({"params": params}, x))
  return jax.jit(fn, in_shardings=(replicated, batch_sharding),
                 out_shardings=batch_sharding)


def predict_volume(predict_fn: Callable, params, image: Volume, mesh, *,
                   window: Sequence[int], overlap: float = 0.5,
                   batch_size: int = 2) -> np.ndarray:
  """Blended probabilities float32 [depth, height, width, 2] for `image`."""
  shape = image.shape
  window = [int(w) for w in window]
  starts = list(itertools.product(
      *[window_starts(s, w, overlap) for s, w in zip(shape, window)]))
  weights = blending_weights(window)
  total = np.zeros((*shape, 2), np.float32)
  norm = np.zeros(shape, np.float32)
  n_dev = mesh.devices.size
  batch_size = max(batch_size - batch_size % n_dev, n_dev)
  batch_sharding = NamedSharding(mesh, P("data"))
  for group in _batches(starts, batch_size):
    patches = [read_window(image, s, window) for s in group]
    while len(patches) < batch_size:  # fixed batch: one compiled program
      patches.append(patches[-1])
    x = np.stack(patches).astype(np.float32)[..., None] / 255.0
    probs = np.asarray(predict_fn(params, jax.device_put(jnp.asarray(x),
                                                         batch_sharding)))
    for start, prob in zip(group, probs):
      region = tuple(slice(st, min(st + w, s)) for st, w, s in zip(start, window, shape))
      crop = tuple(slice(0, r.stop - r.start) for r in region)
      total[region] += prob[crop] * weights[crop][..., None]
      norm[region] += weights[crop]
  return total / norm[..., None]


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
  return np.clip(np.round(probabilities * 255.0), 0, 255).astype(np.uint8)
