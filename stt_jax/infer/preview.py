"""PNG overlays of a segmentation: the EM section in grey, each instance in its
own colour (the same colour on every section), its contour in white."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def colours(labels: np.ndarray) -> np.ndarray:
  """[..., 3] uint8 colour per id (0 -> black), stable across sections: the
  hue steps by the golden ratio, so neighbouring ids differ."""
  hue = (labels.astype(np.float64) * 0.618033988749895) % 1.0
  h6 = hue * 6.0
  x = 1.0 - np.abs(h6 % 2.0 - 1.0)
  sector = h6.astype(np.int64) % 6
  rgb = np.zeros((*labels.shape, 3))
  table = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)]
  for k, (r, g, b) in enumerate(table):
    sel = sector == k
    for c, v in enumerate((r, g, b)):
      rgb[..., c][sel] = (v[sel] if isinstance(v, np.ndarray) else v)
  rgb = 0.35 + 0.65 * rgb
  rgb[labels == 0] = 0.0
  return (rgb * 255).astype(np.uint8)


def contours(labels: np.ndarray) -> np.ndarray:
  """Pixels of an instance with a 4-neighbour of another id."""
  edge = np.zeros(labels.shape, bool)
  for axis in (0, 1):
    diff = np.diff(labels, axis=axis) != 0
    lead = [slice(None)] * 2
    lead[axis] = slice(0, -1)
    trail = [slice(None)] * 2
    trail[axis] = slice(1, None)
    edge[tuple(lead)] |= diff
    edge[tuple(trail)] |= diff
  return edge & (labels > 0)


def overlay(section: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """RGB uint8 [height, width, 3] of an EM section [height, width] and its
  instance ids."""
  grey = np.repeat(np.asarray(section, np.float64)[..., None], 3, -1)
  if section.dtype != np.uint8:
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / max(hi - lo, 1e-12) * 255.0
  inside = (labels > 0)[..., None]
  out = np.where(inside, (1 - alpha) * grey + alpha * colours(labels), grey)
  out[contours(labels)] = 255.0
  return np.clip(out, 0, 255).astype(np.uint8)


def default_sections(depth: int, count: int = 3) -> list[int]:
  """`count` sections spread over the depth (quarters for 3), fewer on a
  shallower volume."""
  return sorted({min(int(round((k + 1) * depth / (count + 1))), depth - 1)
                 for k in range(count)})


def check_sections(sections: Sequence[int], depth: int) -> list[int]:
  """The z indices to preview (default: spread over `depth`); UserError
  naming those outside the volume."""
  sections = [int(z) for z in sections] or default_sections(depth)
  bad = [z for z in sections if not 0 <= z < depth]
  if bad:
    from stt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f"infer.preview_sections {bad} lie outside the volume's sections "
                    f"0..{depth - 1}")
  return sections


def write_previews(image, instances, out_dir: str, sections: Sequence[int] = (),
                   max_size: int = 2048) -> list[str]:
  """previews/z<index>.png for each section (default: 3 spread over the
  depth), images shrunk to at most `max_size` pixels a side."""
  sections = check_sections(sections, instances.shape[0])
  folder = os.path.join(out_dir, "previews")
  os.makedirs(folder, exist_ok=True)
  h, w = instances.shape[1:3]
  step = max(1, int(np.ceil(max(h, w) / max_size)))
  written = []
  for z in sections:
    section = image.read([z, 0, 0], [1, h, w])[0][::step, ::step]
    labels = instances.read([z, 0, 0], [1, h, w])[0][::step, ::step]
    path = os.path.join(folder, f"z{z:05d}.png")
    Image.fromarray(overlay(section, labels)).save(path)
    written.append(path)
  return written
