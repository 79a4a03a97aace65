"""STT-UNET's attention implementations against XLA's: same function, step time.

  python3 bench/attention_impl.py [--patch=16,128,128] [--batch=2] [--impls=xla,pallas]
  python3 bench/attention_impl.py --patch=32,320,320 --chunks=4 --impls=xla,pallas,cudnn
  # on a CPU: the binned VNC III STT-UNET's widths and patch (README "Binned input")
  PYTHONPATH=. .venv/bin/python bench/attention_impl.py --patch=4,128,128 --dtype=float32 \
      --impls=heads_major,auto --override="model.widths=(12,16,24,32,48)" --override=model.norm=group

Builds configs/mitoem_r.py's STT-UNET (bf16 by default), runs forward and
gradient once per model.attention.implementation in --impls (the first is the
reference), prints the largest gradient difference to the reference (relative
to the largest gradient entry, and the worst leaf on its own scale) and the
step times (all compiled first, then timed round-robin), and writes
bench/results/attention_impl-<device>.json. "pallas" is the fused spatial
attention (stt_jax/models/fused_attention.py), "cudnn" cuDNN's fused kernel
where it applies. Off a GPU "pallas" runs in Pallas' interpreter: numbers,
not speed. "heads_major" is XLA's attention with the heads ahead of the
tokens, "unrolled" takes the keys one at a time (on CPUs "auto" picks
unrolled for up to 8 keys, heads_major beyond). --override sets any other
config field.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import aot_timing  # noqa: E402
from config_overrides import apply_overrides  # noqa: E402  bench/, beside this file
import mitoem_r  # noqa: E402
import result_files  # noqa: E402
from stt_jax.models import unet  # noqa: E402
from stt_jax.train import state as state_lib  # noqa: E402


# leaves whose gradient is below this share of the model's largest are not
# compared on their own scale: the key projections' biases, for one, get an
# exactly zero gradient in exact arithmetic (softmax ignores a shift shared by
# every key), so their computed values are rounding noise (~1e-10) that any two
# implementations disagree on by ~100 %
LEAF_FLOOR = 1e-4


def gradient_difference(reference, other) -> dict:
  """Largest |reference - other| over the model, relative to its largest
  gradient entry; and the worst leaf on its own scale, among leaves above
  LEAF_FLOOR of that largest entry."""
  leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  others = jax.tree.leaves(other)
  largest = max(float(jnp.max(jnp.abs(a))) for _, a in leaves)
  diffs = [(float(jnp.max(jnp.abs(a - b))), float(jnp.max(jnp.abs(a))), jax.tree_util.keystr(p))
           for (p, a), b in zip(leaves, others)]
  leaf = max((d / scale, name) for d, scale, name in diffs if scale >= LEAF_FLOOR * largest)
  return {"grad_difference_of_largest": max(d for d, _, _ in diffs) / largest,
          "leaf_grad_difference": leaf[0], "leaf": leaf[1]}


def perturbed_params(model, patch) -> dict:
  """`model`'s initial parameters for [*, *patch, 1] inputs, with the SST
  blocks' output projections moved off zero: a fresh SST block is the
  identity (zero output projection), and attention must reach the output."""
  params = state_lib.init_params(model, patch, seed=0)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.02 if "proj" in jax.tree_util.keystr(path) else p, params)


def sigmoid_square_loss(model, image):
  """params -> mean(sigmoid(model(image))^2): a scalar through every output."""
  return lambda p: jnp.mean(jax.nn.sigmoid(model.apply({"params": p}, image)) ** 2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", default="16,128,128")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--impls", default="xla,pallas",
                      help="comma list of model.attention.implementation; the first is "
                      "the reference")
  parser.add_argument("--chunks", type=int, default=1, help="model.attention.chunks")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config field, e.g. model.widths=(12,16,24,32,48) (repeatable)")
  args = parser.parse_args()
  patch = tuple(int(v) for v in args.patch.split(","))
  impls = [i for i in args.impls.split(",") if i]
  image = jnp.asarray(np.random.default_rng(0).random((args.batch, *patch, 1), np.float32))
  out = {"device": jax.devices()[0].device_kind, "patch": list(patch), "batch": args.batch,
         "dtype": args.dtype, "chunks": args.chunks, "reference": impls[0],
         "overrides": list(args.override), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  path = result_files.results_path(
      "attention_impl" + result_files.override_tag(args.override), out["device"])
  params = reference = None
  compiled = []
  for impl in impls:
    cfg = mitoem_r.get_config("stt")
    cfg.model.compute_dtype = args.dtype
    cfg.model.attention.implementation = impl
    cfg.model.attention.chunks = args.chunks
    apply_overrides(cfg, args.override)
    model = unet.from_config(cfg.model)
    if params is None:
      params = perturbed_params(model, patch)
    timed = aot_timing.compile_and_time(jax.value_and_grad(sigmoid_square_loss(model, image)),
                                        (params,), 0)
    compile_s, hlo = timed.compile_s, timed.compiled.as_text()
    value, grads = timed.outputs
    row = {"compile_s": compile_s, "loss": float(value),
           "cudnn_attention_calls": hlo.count("__cudnn$fmha"),
           "triton_calls": hlo.count("__gpu$xla.gpu.triton")}
    if reference is None:
      reference = grads
    else:
      row.update(gradient_difference(reference, grads))
    out[impl] = row
    compiled.append((timed.compiled, (params,)))
    diff = (f", gradients within {row['grad_difference_of_largest']:.2g} of the largest and "
            f"{row['leaf_grad_difference']:.2g} of {row['leaf']}'s largest"
            if "leaf" in row else "")
    print(f"{impl}: compile {compile_s:.1f} s, loss {row['loss']:.6f}{diff}", flush=True)
    # after every implementation: a cut run keeps its compile times and gradient checks
    result_files.write_json(path, out, quiet=True)
    del grads, timed
  # timed round-robin, after all are compiled: drift hits every implementation alike
  for impl, step_s in zip(impls, aot_timing.time_interleaved(compiled, args.repeats)):
    out[impl]["step_s"] = step_s
    print(f"{impl}: {step_s * 1e3:.1f} ms fwd+grad (median of {args.repeats}, interleaved)")
  for impl in impls[1:]:
    print(f"{impl} / {impls[0]}: {out[impls[0]]['step_s'] / out[impl]['step_s']:.2f}x")
  result_files.write_json(path, out)


if __name__ == "__main__":
  main()
