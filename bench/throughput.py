"""Forward and train-step throughput of the Res-UNet on this machine.

  .venv/bin/python bench/throughput.py            # CPU-sized cases
  .venv/bin/python bench/throughput.py --large    # adds the paper's 32x320x320

Prints one table (voxels/s, step time, compile time, peak memory, and the
ratio against the PyTorch reference where shared/notes/reference-facts.md
gives a measured figure for the same work on a 2-core CPU) and writes JSON to
bench/results/throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import result_files  # noqa: E402  (bench/, beside this file)
from stt_jax.config import default_config  # noqa: E402
from stt_jax.train import loop, step as step_lib  # noqa: E402

BASELINE = (28, 36, 48, 64, 80)
DEMO = (12, 16, 24, 32, 48)
# PyTorch Res-UNET-R forward, fp32, batch 1, on a 2-core CPU (reference-facts §8)
TORCH_CPU_FORWARD_S = {(8, 64, 64): 0.6, (32, 256, 256): 20.0, (36, 320, 320): 35.0}


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure(kind: str, widths, patch, batch: int, repeats: int) -> dict:
  cfg = default_config()
  cfg.model.widths = widths
  cfg.data.patch_shape = patch
  cfg.train.batch_size = batch
  setup = loop.build(cfg)
  model, state, mesh = setup.model, setup.state, setup.mesh
  rng = np.random.default_rng(0)
  image = rng.random((batch, *patch, 1)).astype(np.float32)
  target = (rng.random((batch, *patch, 2)) < 0.1).astype(np.float32)
  batch_arrays = step_lib.shard_batch({"image": image, "target": target}, mesh)
  if kind == "forward":
    forward = model.clone(forward_only=True)  # as segment's windows run it
    fn = jax.jit(lambda p, x: forward.apply({"params": p}, x))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state.params, batch_arrays["image"]))
    compile_s = time.perf_counter() - t0
    step_s = _time(lambda: fn(state.params, batch_arrays["image"]), repeats)
  else:
    step_fn = setup.jit_step(cfg.loss)
    key = jax.random.key_data(jax.random.key(0))
    t0 = time.perf_counter()
    state, _ = step_fn(state, batch_arrays, key)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one():
      holder["state"], metrics = step_fn(holder["state"], batch_arrays, key)
      return metrics["loss"]
    step_s = _time(one, repeats)
  voxels = batch * int(np.prod(patch))
  row = {"kind": kind, "widths": list(widths), "patch": list(patch), "batch": batch,
         "step_s": step_s, "voxels_per_s": voxels / step_s, "compile_s": compile_s}
  torch_s = TORCH_CPU_FORWARD_S.get(tuple(patch))
  if (kind == "forward" and batch == 1 and tuple(widths) == BASELINE and torch_s
      and jax.default_backend() == "cpu"):
    row["torch_cpu_forward_s"] = torch_s
    row["speedup_vs_torch"] = torch_s / step_s
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
  row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--large", action="store_true", help="add 32x320x320, batch 2")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cases = [("forward", BASELINE, (8, 64, 64), 1), ("train", DEMO, (8, 64, 64), 2),
           ("train", BASELINE, (8, 64, 64), 2)]
  if args.large:
    cases += [("forward", BASELINE, (32, 320, 320), 2), ("train", BASELINE, (32, 320, 320), 2)]
  device = jax.devices()[0]
  rows = [measure(*case, repeats=args.repeats) for case in cases]
  header = (f"{'kind':<8}{'widths':<22}{'patch':<14}{'batch':>5}{'step s':>9}"
            f"{'voxels/s':>12}{'compile s':>10}{'peak RSS MiB':>13}{'vs torch':>9}")
  print(f"device: {device.device_kind} ({jax.device_count()} x {device.platform}), "
        f"jax {jax.__version__}")
  print(header)
  for r in rows:
    ratio = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
    print(f"{r['kind']:<8}{str(tuple(r['widths'])):<22}{'x'.join(map(str, r['patch'])):<14}"
          f"{r['batch']:>5}{r['step_s']:>9.3f}{r['voxels_per_s']:>12.3g}"
          f"{r['compile_s']:>10.1f}{r['peak_rss_bytes'] / 2**20:>13.0f}{ratio:>9}")
  path = result_files.results_path("throughput", device.device_kind)
  result_files.write_json(path, {"device": device.device_kind, "platform": device.platform,
                                 "device_count": jax.device_count(), "jax": jax.__version__,
                                 "rows": rows})


if __name__ == "__main__":
  main()
