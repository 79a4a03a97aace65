"""The deformable fusion's conv on its own: forward + gradient time and accuracy
for each way of computing its gradient's scatter-add.

  python3 bench/deform_impl.py [--shape=16,160,160,36] [--groups=4]
      [--variants=float32,float32+tap_major,float32+sorted,input,input+sorted]

A variant is the dtype the bilinear sampling and the gradient's scatter-add
sum in (float32, or input: the inputs' dtype), optionally "+sorted" (the
samples sorted by the row they read before that scatter-add) or "+tap_major"
(taken tap by tap instead of pixel by pixel): deformable_conv2d's
accumulate_dtype and gradient.

Default shape: one level-1 chunk of the paper's STT-UNET step (32x320x320,
batch 2, chunks 4: 16 slices of 160x160, 36 channels, 4 offset groups), whose
gradient scatter-add was the largest operation of that step on an H200 (README,
"On a GPU, STT-UNET against PyTorch"). Inputs in --dtype (bfloat16), offsets
uniform in +-(--offset-scale) pixels, all rounded to --dtype. Accuracy: each
gradient's relative error to a float32 run on the same (rounded) inputs with
HIGHEST-precision products. Writes
bench/results/deform_impl-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import aot_timing  # noqa: E402
import result_files  # noqa: E402
from stt_jax.models.deformable_conv import GRADIENTS, deformable_conv2d  # noqa: E402

ARGS = ("x", "offsets", "kernel")


def inputs(shape, groups: int, offset_scale: float, seed: int = 0) -> dict:
  """float32 numpy inputs: x [n, h, w, c], offsets [n, h, w, groups, 9, 2],
  kernel [3, 3, c, c], probe [n, h, w, c] (the loss is sum(out * probe))."""
  n, h, w, c = shape
  rng = np.random.default_rng(seed)
  return {"x": rng.standard_normal(shape, np.float32),
          "offsets": rng.uniform(-offset_scale, offset_scale,
                                 (n, h, w, groups, 9, 2)).astype(np.float32),
          "kernel": (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32),
          "probe": rng.standard_normal(shape, np.float32)}


def gradient_fn(dtype, accumulate_dtype, gradient: str = "scatter"):
  """(x, offsets, kernel, probe) -> gradients of sum(deform(x) * probe) w.r.t.
  x, offsets and kernel."""
  def loss(x, offsets, kernel, probe):
    out = deformable_conv2d(x.astype(dtype), offsets.astype(dtype), kernel.astype(dtype),
                            accumulate_dtype=accumulate_dtype, gradient=gradient)
    return jnp.sum(out.astype(jnp.float32) * probe)
  return jax.grad(loss, argnums=(0, 1, 2))


def relative_errors(grads, reference) -> dict:
  return {name: float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
          for name, g, r in zip(ARGS, grads, reference)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="16,160,160,36", help="n,h,w,c")
  parser.add_argument("--groups", type=int, default=4)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--variants",
                      default="float32,float32+tap_major,float32+sorted,input,input+sorted",
                      help="comma list of float32 or input (the dtype the scatter-add sums "
                      "in), each optionally +sorted or +tap_major (the scatter-add's order)")
  parser.add_argument("--offset-scale", type=float, default=1.5)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  args = parser.parse_args(argv)
  shape = tuple(int(v) for v in args.shape.split(","))
  # inputs the compute dtype holds exactly: the errors are the computation's,
  # not the inputs' rounding
  data = {k: jnp.asarray(v).astype(args.dtype).astype(jnp.float32)
          for k, v in inputs(shape, args.groups, args.offset_scale).items()}
  operands = (data["x"], data["offsets"], data["kernel"], data["probe"])
  with jax.default_matmul_precision("highest"):
    reference = jax.jit(gradient_fn(jnp.float32, jnp.float32))(*operands)
  out = {"device": jax.devices()[0].device_kind, "shape": list(shape), "groups": args.groups,
         "dtype": args.dtype, "offset_scale": args.offset_scale,
         "reference": "float32 inputs, float32 sampling, HIGHEST products"}
  path = result_files.results_path("deform_impl", out["device"], args.out_dir)
  variants = [v for v in args.variants.split(",") if v]
  for variant in variants:  # all checked before any work
    dtype_name, _, order = variant.partition("+")
    if dtype_name not in ("float32", "input") or order not in ("", *GRADIENTS[1:]):
      parser.error(f"unknown variant {variant!r}: float32 or input, optionally "
                   f"+{' or +'.join(GRADIENTS[1:])}")
  for variant in variants:
    dtype_name, _, order = variant.partition("+")
    accumulate = None if dtype_name == "input" else jnp.float32
    timed = aot_timing.compile_and_time(
        gradient_fn(jnp.dtype(args.dtype), accumulate, order or "scatter"), operands,
        args.repeats)
    step_s, compile_s = timed.step_s, timed.compile_s
    row = {"step_s": step_s, "compile_s": compile_s,
           "pixels_per_s": shape[0] * shape[1] * shape[2] / step_s,
           "grad_relative_error": relative_errors(timed.outputs, reference)}
    out[variant] = row
    errors = ", ".join(f"{k} {v:.2g}" for k, v in row["grad_relative_error"].items())
    print(f"{variant:18s}: {step_s * 1e3:8.2f} ms fwd+grad, compile "
          f"{compile_s:5.1f} s, gradient error {errors}", flush=True)
    result_files.write_json(path, out, quiet=True)  # after every variant: a cut run keeps its rows
  result_files.announce(path)


if __name__ == "__main__":
  main()
