"""VNC III runs side by side with their uncertainty: each run's foreground
Jaccard on the held-out sections 12-15 with a tile-bootstrap 95 % interval
and its AP-50/AP-75 with an instance-group bootstrap one, and every pair's
paired differences (stt_jax/metrics/uncertainty.py), and where each run's
foreground errors lie (near the true boundary, or in invented and missed
objects: stt_jax/metrics/foreground_errors.py).

Reads each run folder's last validation segmentation (val_segmentation/,
written by training or --mode=evaluate), cropped to the scored sections.

  PYTHONPATH=. python bench/vnc3_compare.py [--out=bench/results/vnc3_compare-cpu.json] \
      baseline=runs/g6k stt=runs/stt6k
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import result_files  # noqa: E402  pylint: disable=wrong-import-position  bench/, beside this file
import vnc3  # noqa: E402  pylint: disable=wrong-import-position

from stt_jax.data import datasets, sources  # noqa: E402  pylint: disable=wrong-import-position
from stt_jax.metrics import foreground_errors, report, uncertainty  # noqa: E402  pylint: disable=wrong-import-position


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, one or more")
  parser.add_argument("--out", help="JSON results here")
  args = parser.parse_args(argv)
  if not all("=" in r for r in args.runs):
    parser.error("give each run as NAME=RUN_FOLDER")
  runs, out_path = dict(r.split("=", 1) for r in args.runs), args.out
  cfg = vnc3.get_config("baseline")
  [(_, labels, offset)] = datasets.open_validation_volumes(cfg)
  stop = [o + n for o, n in zip(offset, labels.shape[:3])]
  segs = {name: sources.RegionVolume(sources.open_volume(
              os.path.join(run, "val_segmentation", "instances.zarr")), offset, stop)
          for name, run in runs.items()}
  foreground = lambda v: np.asarray(v.read((0, 0, 0), v.shape[:3])).reshape(v.shape[:3]) > 0
  truth = foreground(labels)  # read once for every run's error breakdown
  results = {}
  for name, seg in segs.items():
    s = report.score_volumes(labels, seg, min_gt_size=cfg.eval.min_gt_size)
    results[name] = {k: s[k] for k in ("jaccard", "dice", "jaccard_ci95", "dice_ci95",
                                       "ci_tiles", "ap_50", "ap_75", "ap_50_ci95",
                                       "ap_75_ci95", "ci_groups")}
    errors = foreground_errors.error_breakdown(truth, foreground(seg))
    results[name]["errors"] = errors
    print(f"{name:<12} Jaccard {s['jaccard']:.4f}, AP-50 {s['ap_50']:.4f}, AP-75 "
          f"{s['ap_75']:.4f}\n  " + uncertainty.format_interval(s).replace("\n", "\n  ")
          + "\n  " + foreground_errors.format_breakdown(errors).replace("\n", "\n  "))
  names = list(segs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      pair = report.compare(labels, segs[a], segs[b], min_gt_size=cfg.eval.min_gt_size)
      results[f"{a} - {b}"] = pair
      print(uncertainty.format_difference(pair, a, b))
      print(uncertainty.format_ap_difference(pair, a, b))
  if out_path:
    result_files.write_json(out_path, {"runs": runs, "results": results})


if __name__ == "__main__":
  main(sys.argv[1:])
