"""How much STT-UNET's additions do in trained weights: for each SST block,
the rms of its attention branch (the zero-initialised `proj` output, what the
block adds) over the rms of the features it is added to, and the rms of its
query/key/value kernels; for the denoiser, how much it changes the image.

A fresh block is the identity (ratio 0); weights the optimiser has switched
off show ratios of a few thousandths and q/k/v kernels far below their
initial rms (1/sqrt(width)). docs/architecture.md "Coupled L2 and fresh blocks".

  PYTHONPATH=. .venv/bin/python bench/sst_branch_size.py --weights=EXPORT \
      [--image=../shared/data/vnc3/stack1/raw --start=12,0,0 --size=4,1024,1024] \
      [--out=bench/results/sst_branch_size-NAME.json]

EXPORT is a `--mode=export` folder. The image box is read whole, binned by
the export's model.input_scale (box means rounded to uint8, as training reads it) and run as
one window, so keep it small.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import result_files  # noqa: E402  pylint: disable=wrong-import-position  bench/, beside this file


def _rms(a) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


@functools.lru_cache(maxsize=4)
def _capture(model):
  """The forward pass returning every submodule's output, compiled once per model."""
  def run(params, image):
    _, state = model.apply({"params": params}, image, capture_intermediates=True,
                           mutable=["intermediates"])
    return state["intermediates"]
  return jax.jit(run)


def intermediates(model, params, image) -> dict:
  """Every submodule's outputs: {name: {"__call__": (output,), child: {...}}}."""
  return _capture(model)(params, image)


def branch_sizes(model, params, image) -> dict:
  """{block: {"branch_over_input": r, "spatial_query_kernel_rms": rms, ...},
  "denoise": {"change_over_image": r}}.

  image: [batch, depth, height, width, 1] float32 in [0, 1], as the model reads it."""
  inter = intermediates(model, params, image)
  out = {}
  for name in sorted(k for k in inter if k.startswith("sst")):
    block_out = np.asarray(inter[name]["__call__"][0], np.float64)
    branch = np.asarray(inter[name]["proj"]["__call__"][0], np.float64)
    row = {"branch_over_input": _rms(branch) / _rms(block_out - branch)}
    for stream in ("spatial", "temporal"):
      for part in ("query", "key", "value"):
        row[f"{stream}_{part}_kernel_rms"] = _rms(params[name][stream][part]["kernel"])
    out[name] = row
  if "denoise" in inter:
    restored = np.asarray(inter["denoise"]["__call__"][0], np.float64)
    out["denoise"] = {"change_over_image": _rms(restored - np.asarray(image)) / _rms(image)}
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", required=True, help="an export folder (--mode=export)")
  parser.add_argument("--image", default=os.path.join(ROOT, "..", "shared", "data", "vnc3",
                                                      "stack1", "raw"))
  parser.add_argument("--start", default="12,0,0", help="z,y,x of the box, input voxels")
  parser.add_argument("--size", default="4,1024,1024", help="d,h,w of the box, input voxels")
  parser.add_argument("--out", help="JSON results here")
  args = parser.parse_args(argv)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax.data import rescaled, sources  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  from stt_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if not checkpoint.is_export(args.weights):
    parser.error(f"--weights {args.weights} is not an stt_jax export; make one with --mode=export")
  model_cfg = ml_collections.ConfigDict(checkpoint.read_export_model_config(args.weights))
  if model_cfg.attention.design == "none":
    parser.error(f"--weights {args.weights} is a baseline: it has no SST blocks")
  start = tuple(int(v) for v in args.start.split(","))
  size = tuple(int(v) for v in args.size.split(","))
  factors = tuple(int(v) for v in model_cfg.input_scale)
  if any(a % f or n % f for a, n, f in zip(start, size, factors)):
    parser.error(f"--start and --size must be multiples of model.input_scale {factors}")
  model = unet.from_config(model_cfg)
  binned_start = tuple(a // f for a, f in zip(start, factors))
  binned_size = tuple(n // f for n, f in zip(size, factors))
  params = checkpoint.load_export(args.weights, model, binned_size, step_lib.make_mesh())
  # binned as training and segment read it (box means, rounded to uint8)
  volume = rescaled.BinnedVolume(sources.open_volume(args.image), factors, "mean")
  box = np.asarray(volume.read(binned_start, binned_size), np.float32) / 255.0
  sizes = branch_sizes(model, params, box[None, ..., None])
  print(f"{'block':10s} {'branch/input':>12s}  q/k/v kernel rms (spatial | temporal)")
  for name, row in sizes.items():
    if name == "denoise":
      print(f"{'denoise':10s} {row['change_over_image']:12.4f}  (image change / image)")
      continue
    qkv = lambda s: " ".join(f"{row[f'{s}_{p}_kernel_rms']:.4f}" for p in ("query", "key", "value"))
    print(f"{name:10s} {row['branch_over_input']:12.4f}  {qkv('spatial')} | {qkv('temporal')}")
  if args.out:
    result_files.write_json(args.out, {"weights": os.path.abspath(args.weights),
                                       "image": args.image, "start": start, "size": size,
                                       "blocks": sizes})


if __name__ == "__main__":
  main()
