"""Peak memory of patch feeding from a volume far larger than memory.

  .venv/bin/python bench/data_memory.py      # 512x4096x4096 uint8 (8.6 GB on disk)

Writes (once, chunk by chunk, never whole in memory) an image zarr of
incompressible noise and a labels zarr of the same shape whose chunks are
written only in a 32x1024x1024 corner (the rest reads as the fill value 0),
then draws --patches patches of 32x320x320 through the training sampler
(TensorStore reads, flips/transpose, targets) and reports the process's peak
RSS. Writes bench/results/data_memory-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import result_files  # noqa: E402  bench/, beside this file
from stt_jax import memory_use  # noqa: E402
from stt_jax.config import AUGMENT_PROBABILITIES, default_config  # noqa: E402
from stt_jax.data import sources  # noqa: E402
from stt_jax.data.sampler import PatchSampler  # noqa: E402

PATCH_SHAPE = (32, 320, 320)


def du_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def make_volumes(directory: str, shape) -> tuple[str, str]:
  image_path = os.path.join(directory, "image.zarr")
  label_path = os.path.join(directory, "labels.zarr")
  if os.path.exists(os.path.join(label_path, "zarr.json")):
    return image_path, label_path
  chunks = (32, 512, 512)
  image = sources.create_volume(image_path, shape, np.uint8, chunks=chunks)
  rng = np.random.default_rng(0)
  for z in range(0, shape[0], chunks[0]):
    for y in range(0, shape[1], 2048):  # 32x2048x4096 = 256 MB per write
      depth, rows = min(chunks[0], shape[0] - z), min(2048, shape[1] - y)
      block = rng.integers(0, 256, (depth, rows, shape[2]), dtype=np.uint8)
      image.write([z, y, 0], block)
  labels = sources.create_volume(label_path, shape, np.uint32, chunks=chunks)
  corner_shape = (min(32, shape[0]), min(1024, shape[1]), min(1024, shape[2]))
  corner = np.zeros(corner_shape, np.uint32)
  yy, xx = np.mgrid[:corner_shape[1], :corner_shape[2]]
  span = min(corner_shape[1:])  # 1024 at the default shape: centres in [40, 984)
  low = min(40, span // 2)
  for i, (cy, cx) in enumerate(rng.integers(low, max(low + 1, span - 40), (60, 2))):
    corner[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 30 ** 2] = i + 1
  labels.write([0, 0, 0], corner)
  return image_path, label_path


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/stt_jax_bench_memory")
  parser.add_argument("--shape", type=int, nargs=3, default=(512, 4096, 4096))
  parser.add_argument("--patches", type=int, default=1000)
  parser.add_argument("--feed-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if any(n < p for n, p in zip(args.shape, PATCH_SHAPE)):
    parser.error(f"--shape {' '.join(map(str, args.shape))} is smaller than one "
                 f"{'x'.join(map(str, PATCH_SHAPE))} patch in some axis; give at least that")
  if not args.feed_only:
    # write in this process, feed in a fresh one: its peak RSS is feeding's alone
    t0 = time.perf_counter()
    make_volumes(args.workdir, tuple(args.shape))
    print(f"volumes ready in {time.perf_counter() - t0:.0f} s (peak RSS while "
          f"writing {memory_use.peak_resident_mb():.0f} MiB)", flush=True)
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                              *sys.argv[1:], "--feed-only"])
  image_path, label_path = make_volumes(args.workdir, tuple(args.shape))
  image = sources.open_volume(image_path)
  labels = sources.open_volume(label_path)
  augment = default_config().data.augment
  for key in AUGMENT_PROBABILITIES:
    augment[key] = 0.0
  # the labels are empty outside one corner (34 GB of uint32 otherwise):
  # skip the sampler's "no foreground" probe
  sampler = PatchSampler(image, labels, patch_shape=PATCH_SHAPE, batch_size=2, seed=0,
                         augment_config=augment, check_foreground=False)
  t0 = time.perf_counter()
  batches = args.patches // 2
  checksum = 0.0
  for _, batch in sampler.iterate(0, batches, prefetch=4):
    checksum += float(batch["image"][:, 0, 0, 0, 0].sum())
  feed_s = time.perf_counter() - t0
  result = {
      "shape": list(image.shape), "image_bytes_on_disk": du_bytes(image_path),
      "patches": batches * 2, "patch": list(PATCH_SHAPE), "feed_seconds": feed_s,
      "patches_per_s": batches * 2 / feed_s, "peak_rss_mb": memory_use.peak_resident_mb()}
  print(json.dumps(result, indent=2))
  result_files.write_json(os.path.join(result_files.RESULTS_DIR, "data_memory-cpu.json"),
                          result)


if __name__ == "__main__":
  main()
