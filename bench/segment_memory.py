"""Memory bars of whole-volume segmentation (issue 6), each in a fresh process.

  .venv/bin/python bench/segment_memory.py              # all three
  .venv/bin/python bench/segment_memory.py --only=segment

1. segment: the full `segment` path (read -> model -> blend -> uint8 zarr ->
   blockwise decode -> morphology -> previews) on two synthetic volumes, the
   second 8x the first (2x per axis), in 16x128x128 blocks so that the
   smaller volume (3x3x3 blocks) already has an interior block; peak RSS of
   each run.
2. decode: probability maps made from ground-truth labels plus noise (no
   model) of --big_shape (>= 4 GB of uint8 probabilities), decoded blockwise
   with `--mode=decode`, then scored with `--mode=evaluate --labels`; peak RSS
   and seconds of each, and the number of instances AP was computed over.
Volumes are built tile by tile (a few synthetic tiles, flipped, ids offset per
tile), never whole in memory. Writes bench/results/segment_memory-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import result_files  # noqa: E402  bench/, beside this file
from stt_jax.data import sources, synthetic  # noqa: E402
from stt_jax.data.targets import instance_contour  # noqa: E402

TILE = (32, 512, 512)


def _tiles(count: int, with_labels: bool):
  spec = synthetic.SyntheticSpec(shape=TILE, num_mitochondria=110)
  return [synthetic.generate(spec, seed) for seed in range(count)]


def _tile_at(tiles, k: int):
  image, labels = tiles[k % len(tiles)]
  flips = [(k >> b) & 1 for b in range(3)]
  for axis, flip in enumerate(flips):
    if flip:
      image, labels = np.flip(image, axis), np.flip(labels, axis)
  return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def make_image(path: str, shape, tiles) -> None:
  if os.path.exists(os.path.join(path, "zarr.json")):
    return
  vol = sources.create_volume(path, shape, np.uint8, chunks=(16, 256, 256),
                              voxel_size_nm=(30.0, 8.0, 8.0))
  k = 0
  for z in range(0, shape[0], TILE[0]):
    for y in range(0, shape[1], TILE[1]):
      for x in range(0, shape[2], TILE[2]):
        tile = _tile_at(tiles, k)[0][:shape[0] - z, :shape[1] - y, :shape[2] - x]
        vol.write([z, y, x], np.ascontiguousarray(tile))
        k += 1


def make_labels_and_probabilities(directory: str, shape, tiles) -> tuple[str, str]:
  """labels.zarr (uint32, ids unique per tile) and probabilities.zarr
  ([z, y, x, 2] uint8: mask and contour from the labels, plus noise)."""
  label_path = os.path.join(directory, "labels.zarr")
  prob_path = os.path.join(directory, "probabilities.zarr")
  if os.path.exists(os.path.join(directory, "done")):
    return label_path, prob_path
  labels_vol = sources.create_volume(label_path, shape, np.uint32, chunks=(32, 512, 512),
                                     voxel_size_nm=(30.0, 8.0, 8.0), overwrite=True)
  probs_vol = sources.create_volume(prob_path, (*shape, 2), np.uint8,
                                    chunks=(32, 512, 512, 2),
                                    voxel_size_nm=(30.0, 8.0, 8.0), overwrite=True)
  prepared = []
  rng = np.random.default_rng(0)
  for k in range(len(tiles) * 8):
    _, labels = _tile_at(tiles, k)
    mask = (labels > 0).astype(np.float32)
    contour = instance_contour(labels, 1).astype(np.float32) * mask
    probs = np.stack([mask, contour], -1)
    probs += rng.normal(0, 0.1, probs.shape).astype(np.float32)
    prepared.append((labels, np.clip(np.round(probs * 255), 0, 255).astype(np.uint8)))
  k, offset = 0, 0
  for z in range(0, shape[0], TILE[0]):
    for y in range(0, shape[1], TILE[1]):
      for x in range(0, shape[2], TILE[2]):
        labels, probs = prepared[k % len(prepared)]
        labels_vol.write([z, y, x], np.where(labels > 0, labels + offset, 0).astype(np.uint32))
        probs_vol.write([z, y, x, 0], probs)
        offset += int(labels.max())
        k += 1
  open(os.path.join(directory, "done"), "w").close()
  return label_path, prob_path


def _run(cmd: list[str]) -> dict:
  """Runs cmd under /usr/bin/time -v; returns seconds and peak RSS (MiB)."""
  t0 = time.perf_counter()
  proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  seconds = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  rss_kb = [int(l.split(":")[1]) for l in proc.stderr.splitlines()
            if "Maximum resident set size" in l][0]
  return {"seconds": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024.0, 1),
          "stdout": proc.stdout.strip().splitlines()[-14:]}


def bench_segment(work: str) -> dict:
  tiles = _tiles(2, with_labels=False)
  rows = {}
  for name, shape in (("small", (48, 384, 384)), ("8x", (96, 768, 768))):
    image = os.path.join(work, f"image_{name}.zarr")
    make_image(image, shape, tiles)
    out = os.path.join(work, f"seg_{name}")
    result = _run([sys.executable, os.path.join(ROOT, "tests/infer/segment_job.py"),
                   image, out, "--overwrite", "--bench"])
    result["shape"] = list(shape)
    result["voxels_per_s"] = round(float(np.prod(shape)) / result["seconds"])
    rows[name] = result
    print(f"segment {name:>5} {shape}: {result['seconds']:.0f} s, peak RSS "
          f"{result['peak_rss_mb']:.0f} MiB", flush=True)
  rows["rss_ratio"] = rows["8x"]["peak_rss_mb"] / rows["small"]["peak_rss_mb"]
  return rows


def bench_decode(work: str, shape) -> dict:
  directory = os.path.join(work, "big")
  os.makedirs(directory, exist_ok=True)
  t0 = time.perf_counter()
  labels, probs = make_labels_and_probabilities(directory, shape, _tiles(4, True))
  print(f"built {shape} labels + probabilities in {time.perf_counter() - t0:.0f} s",
        flush=True)
  config = os.path.join(ROOT, "configs/mitoem_r.py")
  decoded = os.path.join(directory, "decoded")
  common = [sys.executable, "-m", "stt_jax.main", f"--config={config}", "--quiet",
            "--overwrite", "--config.decode.min_size=64", "--config.decode.min_seed_size=16"]
  decode = _run([*common, "--mode=decode", f"--input={probs}", f"--output={decoded}"])
  print(f"decode {shape}: {decode['seconds']:.0f} s, peak RSS {decode['peak_rss_mb']:.0f} MiB",
        flush=True)
  evaluate = _run([*common, "--mode=evaluate", f"--input={decoded}", f"--labels={labels}",
                   "--config.eval.min_gt_size=0",
                   f"--output={os.path.join(directory, 'eval.json')}"])
  with open(os.path.join(directory, "eval.json")) as f:
    scores = json.load(f)
  print(f"evaluate: {evaluate['seconds']:.0f} s ({scores['seconds']:.0f} s scoring), peak "
        f"RSS {evaluate['peak_rss_mb']:.0f} MiB, {scores['num_gt']} GT / "
        f"{scores['num_pred']} predicted instances, AP-75 {scores['ap_75']:.3f}", flush=True)
  prob_bytes = int(np.prod(shape)) * 2
  return {"shape": list(shape), "probability_bytes": prob_bytes, "decode": decode,
          "evaluate": evaluate, "scores": scores,
          "decode_voxels_per_s": round(float(np.prod(shape)) / decode["seconds"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", default="/tmp/stt_jax_segment_memory")
  parser.add_argument("--only", choices=["segment", "decode"], default=None)
  parser.add_argument("--big_shape", default="128,4096,4096")
  args = parser.parse_args()
  os.makedirs(args.work, exist_ok=True)
  results = {"machine": f"{os.cpu_count()} CPU cores"}
  if args.only in (None, "segment"):
    results["segment"] = bench_segment(args.work)
  if args.only in (None, "decode"):
    results["decode"] = bench_decode(args.work, tuple(int(v) for v in args.big_shape.split(",")))
  name = "segment_memory-cpu.json" if args.only is None else f"segment_memory-{args.only}-cpu.json"
  result_files.write_json(os.path.join(result_files.RESULTS_DIR, name), results)


if __name__ == "__main__":
  main()
