"""Patch feeding rate with every augmentation on, beside the train step's
consumption rate on this machine.

  .venv/bin/python bench/data_throughput.py            # paper patch 32x320x320, batch 2
  python3 bench/data_throughput.py --workers=1,2,4,8,16 # a GPU machine's cores

Generates one synthetic EM volume (zarr, under --workdir), then times the
sampler (TensorStore reads, all augmentations, targets) with each --workers
count of threads (training's default, data.workers=0, is one per core) at the
paper's patch, and one jitted train step of the baseline (demo
widths and the paper's). On CPU the step runs at --step-patch (a 32x320x320
batch-2 step needs more memory than a 24 GiB machine has: XLA plans 48 GiB of
scratch for it), so compare voxels/s. Prints one table, writes
bench/results/data_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import result_files  # noqa: E402  bench/, beside this file
from stt_jax.config import AUGMENT_PROBABILITIES, default_config  # noqa: E402
from stt_jax.data import sources, synthetic  # noqa: E402
from stt_jax.data.sampler import PatchSampler  # noqa: E402
from stt_jax.train import loop, step as step_lib  # noqa: E402


def feeder_rate(image, labels, patch, batch, workers, batches):
  cfg = default_config().data.augment
  for key in AUGMENT_PROBABILITIES:
    cfg[key] = 1.0  # the worst case: every transform on every patch
  sampler = PatchSampler(image, labels, patch_shape=patch, batch_size=batch, seed=0,
                         augment_config=cfg, foreground_bias=0.5)
  t0 = time.perf_counter()
  for _ in sampler.iterate(0, batches, prefetch=2 * workers, workers=workers):
    pass
  seconds = time.perf_counter() - t0
  return batches * batch / seconds


def step_rate(widths, patch, batch, repeats=3):
  cfg = default_config()
  cfg.model.widths = widths
  cfg.data.patch_shape = patch
  cfg.train.batch_size = batch
  setup = loop.build(cfg, jax.devices()[:1])
  fn = setup.jit_step(cfg.loss)
  rng = np.random.default_rng(0)
  data = step_lib.shard_batch({
      "image": rng.random((batch, *patch, 1)).astype(np.float32),
      "target": (rng.random((batch, *patch, 2)) < 0.1).astype(np.float32)}, setup.mesh)
  key = jax.random.key_data(jax.random.key(0))
  state, metrics = fn(setup.state, data, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = fn(state, data, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return batch / float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/stt_jax_bench_data")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--workers", default="1,2",
                      help="comma-separated feeder thread counts to time")
  parser.add_argument("--skip-paper-step", action="store_true",
                      help="skip timing the paper-width step (slow on CPU)")
  parser.add_argument("--step-patch", type=int, nargs=3, default=None,
                      help="patch of the timed train step (default: the feeder's; "
                           "16 160 160 on CPU)")
  args = parser.parse_args()
  patch, batch = (32, 320, 320), 2
  directory = os.path.join(args.workdir, "volume")
  if not os.path.exists(os.path.join(directory, "labels.zarr")):
    spec = synthetic.SyntheticSpec(shape=(40, 352, 352), num_mitochondria=130)
    synthetic.write_volume_pair(directory, spec, seed=0)
  image = sources.open_volume(os.path.join(directory, "image.zarr"))
  labels = sources.open_volume(os.path.join(directory, "labels.zarr"))
  voxels = int(np.prod(patch))
  rows = []
  for workers in [int(w) for w in args.workers.split(",")]:
    rate = feeder_rate(image, labels, patch, batch, workers, max(args.batches, 2 * workers))
    rows.append({"what": f"feeder, all augmentations, {workers} thread(s)",
                 "patches_per_s": rate, "voxels_per_s": rate * voxels})
  step_patch = tuple(args.step_patch or ((16, 160, 160) if jax.default_backend() == "cpu"
                                         else patch))
  steps = [("demo widths (12-48)", (12, 16, 24, 32, 48))]
  if not args.skip_paper_step:
    steps.append(("paper widths (28-80)", (28, 36, 48, 64, 80)))
  for name, widths in steps:
    rate = step_rate(widths, step_patch, batch)
    rows.append({"what": f"train step {name} at {'x'.join(map(str, step_patch))}",
                 "patches_per_s": rate, "voxels_per_s": rate * int(np.prod(step_patch))})
  device = jax.devices()[0].device_kind.replace(" ", "_")
  print(f"feeder patch {patch}, batch {batch}, {os.cpu_count()} cores, {device}")
  print(f"{'':55s} {'patches/s':>10s} {'voxels/s':>10s}")
  for r in rows:
    print(f"{r['what']:55s} {r['patches_per_s']:10.3f} {r['voxels_per_s']:10.3g}")
  result_files.write_json(
      os.path.join(result_files.RESULTS_DIR, f"data_throughput-{jax.default_backend()}.json"),
      {"patch": patch, "step_patch": step_patch, "batch": batch, "cores": os.cpu_count(),
       "device": device, "rows": rows})


if __name__ == "__main__":
  main()
