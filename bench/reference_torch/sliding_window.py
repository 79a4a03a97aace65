"""Whole-volume sliding-window inference the PyTorch way: the peer of
stt_jax's `segment` prediction stage in bench/segment_throughput.py.

As pytorch_connectomics does it: the volume is read into host memory once,
windows on a regular grid (stride window x (1 - overlap), the last flush with
the end) are batched through the network, each prediction is weighted by a
Gaussian (1e-4 + exp(-r^2 / 2 0.2^2), r the distance from the window centre in
[-1, 1] coordinates) and summed into whole-volume accumulators, then
normalised and written as uint8. To make the peer as strong as it can be, the
accumulators live on the device (pytorch_connectomics keeps them in host
numpy) and the input is uploaded once.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch


def grid(size: int, window: int, overlap: float) -> list[int]:
  if size <= window:
    return [0]
  stride = max(int(round(window * (1.0 - overlap))), 1)
  return list(range(0, size - window, stride)) + [size - window]


def gaussian(window, device) -> torch.Tensor:
  axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
          for n in window]
  zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
  return 1e-4 + torch.exp(-(zz ** 2 + yy ** 2 + xx ** 2) / (2 * 0.2 ** 2))


@torch.inference_mode()
def predict(model: torch.nn.Module, image: np.ndarray, window, overlap: float, batch: int,
            dtype: str, device: torch.device) -> tuple[np.ndarray, dict]:
  """image [d, h, w] uint8 -> (probabilities [d, h, w, channels] uint8, seconds
  spent uploading, in the model, blending and downloading)."""
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  times = dict.fromkeys(("upload", "model", "blend", "download"), 0.0)
  t0 = time.perf_counter()
  volume = torch.from_numpy(image).to(device)
  sync()
  times["upload"] = time.perf_counter() - t0
  corners = list(itertools.product(*(grid(s, w, overlap) for s, w in zip(image.shape, window))))
  weight = gaussian(window, device)
  total = None
  norm = torch.zeros(image.shape, dtype=torch.float32, device=device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  for first in range(0, len(corners), batch):
    chunk = corners[first:first + batch]
    t0 = time.perf_counter()
    crops = [volume[z:z + window[0], y:y + window[1], x_:x_ + window[2]] for z, y, x_ in chunk]
    crops += [torch.zeros_like(crops[0])] * (batch - len(chunk))  # one shape for every batch
    x = torch.stack(crops)[:, None].float().div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with autocast:
      probs = torch.sigmoid(model(x).float())
    sync()
    t1 = time.perf_counter()
    if total is None:
      total = torch.zeros((probs.shape[1], *image.shape), dtype=torch.float32, device=device)
    for p, (z, y, x_) in zip(probs, chunk):
      region = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x_, x_ + window[2]))
      total[(slice(None), *region)] += p * weight
      norm[region] += weight
    sync()
    times["model"] += t1 - t0
    times["blend"] += time.perf_counter() - t1
  t0 = time.perf_counter()
  out = torch.round(total / norm * 255.0).clamp_(0, 255).to(torch.uint8)
  out = out.permute(1, 2, 3, 0).contiguous().cpu().numpy()
  times["download"] = time.perf_counter() - t0
  times["windows"] = len(corners)
  return out, times
