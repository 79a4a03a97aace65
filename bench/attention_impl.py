"""STT-UNET's attention on a GPU: cuDNN's fused kernel against XLA's.

  python3 bench/attention_impl.py [--patch=16,128,128] [--batch=2]

Builds configs/mitoem_r.py's STT-UNET (bf16), runs forward and gradient with
model.attention.implementation = xla and = auto (cuDNN where it applies),
prints the largest output/gradient difference and the step times, and writes
bench/results/attention_impl-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mitoem_r  # noqa: E402
from stt_jax.models import unet  # noqa: E402
from stt_jax.train import state as state_lib  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", default="16,128,128")
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  patch = tuple(int(v) for v in args.patch.split(","))
  image = jnp.asarray(np.random.default_rng(0).random((args.batch, *patch, 1), np.float32))
  out = {"device": jax.devices()[0].device_kind, "patch": list(patch), "batch": args.batch}
  results = {}
  params = None
  for impl in ("xla", "auto"):
    cfg = mitoem_r.get_config("stt")
    cfg.model.compute_dtype = "bfloat16"
    cfg.model.attention.implementation = impl
    model = unet.from_config(cfg.model)
    if params is None:
      params = state_lib.init_params(model, patch, seed=0)
      # a fresh SST block is the identity (zero output projection): perturb it
      # so that attention reaches the output
      params = jax.tree_util.tree_map_with_path(
          lambda path, p: p + 0.02 if "proj" in jax.tree_util.keystr(path) else p, params)
    loss = lambda p: jnp.mean(jax.nn.sigmoid(model.apply({"params": p}, image)) ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    value, grads = jax.block_until_ready(fn(params))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params))
      times.append(time.perf_counter() - t0)
    hlo = fn.lower(params).compile().as_text()
    results[impl] = (value, grads)
    out[impl] = {"step_s": sorted(times)[2], "compile_s": compile_s,
                 "cudnn_attention_calls": hlo.count("__cudnn$fmha")}
    print(f"{impl}: {sorted(times)[2] * 1e3:.1f} ms fwd+grad, compile {compile_s:.1f} s, "
          f"cuDNN attention calls {out[impl]['cudnn_attention_calls']}", flush=True)
  (va, ga), (vb, gb) = results["xla"], results["auto"]
  rel = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
            for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
  out["loss_xla"], out["loss_auto"] = float(va), float(vb)
  out["max_relative_grad_difference"] = rel
  print(f"loss xla {float(va):.6f} auto {float(vb):.6f}; largest relative gradient "
        f"difference {rel:.3g}")
  os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
  name = out["device"].replace(" ", "_").lower()
  path = os.path.join(ROOT, "bench/results", f"attention_impl-{name}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
