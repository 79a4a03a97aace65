"""Training patch feeder on VNC III at several `model.input_scale` binnings.

One feeder thread assembles batches of the config's augmentations (the
`configs/vnc3.py` set) at one patch shape in model voxels; a binned patch
reads f_y * f_x times the input voxels and reduces them (image means, label
modes: stt_jax/data/rescaled.py). Prints ms per batch beside model voxels/s
and writes bench/results/binned_feeder-<cores>cores.json.

  PYTHONPATH=. .venv/bin/python bench/binned_feeder.py [--patch 4 128 128] [--batch 2]
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import result_files  # noqa: E402  pylint: disable=wrong-import-position  bench/, beside this file
import vnc3  # noqa: E402  pylint: disable=wrong-import-position

from stt_jax.train import loop  # noqa: E402  pylint: disable=wrong-import-position


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, nargs=3, default=(4, 128, 128))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--scales", default="1,2,4", help="comma-separated f_y = f_x values")
  args = parser.parse_args(argv)
  rows = []
  print(f"VNC III feeder, patch {tuple(args.patch)} model voxels, batch {args.batch}, "
        f"1 thread, {os.cpu_count()} cores")
  print(f"{'input_scale':>12s} {'ms/batch':>9s} {'model voxels/s':>15s}")
  for f in (int(s) for s in args.scales.split(",")):
    cfg = vnc3.get_config("baseline")
    cfg.model.input_scale = (1, f, f)
    cfg.data.patch_shape = tuple(args.patch)
    cfg.train.batch_size = args.batch
    batches = loop._sampler(cfg).iterate(0, args.batches + 2, prefetch=1, workers=1)  # pylint: disable=protected-access
    for _ in range(2):  # opening, first reads
      next(batches)
    start = time.perf_counter()
    for _ in batches:
      pass
    seconds = (time.perf_counter() - start) / args.batches
    voxels = args.batch * args.patch[0] * args.patch[1] * args.patch[2]
    rows.append({"input_scale": [1, f, f], "ms_per_batch": 1e3 * seconds,
                 "model_voxels_per_s": voxels / seconds})
    print(f"{str((1, f, f)):>12s} {1e3 * seconds:9.0f} {voxels / seconds:15.3g}")
  result_files.write_json(
      os.path.join(result_files.RESULTS_DIR, f"binned_feeder-{os.cpu_count()}cores.json"),
      {"patch": list(args.patch), "batch": args.batch, "threads": 1, "rows": rows})


if __name__ == "__main__":
  main(sys.argv[1:])
