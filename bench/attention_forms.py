"""One attention call in each of its forms: forward and gradient time per shape.

  PYTHONPATH=. .venv/bin/python bench/attention_forms.py
  PYTHONPATH=. .venv/bin/python bench/attention_forms.py --shapes="8192,4,4,4,4;8,4096,256,4,4" \
      --impls=heads_major,unrolled,xla
  # the same under jaxlib's own CPU library fusions (YNNPACK's reductions on):
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
      PYTHONPATH=. .venv/bin/python bench/attention_forms.py --tag=ynn_reductions

`stt_jax.models.attention.attend(q, k, v, impl)` for q [batch, queries, heads,
dim] and k, v [batch, keys, heads, dim], random normal inputs; the gradient is
that of sum(out ** 2) with respect to q, k and v. Every program is compiled
first, then all are timed round-robin (bench/aot_timing.py), medians printed
in ms with each form's largest difference to the first form's output. The
default shapes are the binned VNC III STT-UNET's level-1 streams (batch 2,
4x64x64, 16 channels, 4 heads: the temporal stream's 8,192 pixel columns of 4
keys; the spatial stream's 8 slices of 4,096 queries and 256 pooled keys) and
temporal streams of 8, 16 and 32 keys (where "auto" on a CPU stops unrolling).
Writes bench/results/attention_forms[-<tag>]-<device>.json, with $XLA_FLAGS.
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
from stt_jax.models import attention  # noqa: E402

DEFAULT_SHAPES = "8192,4,4,4,4;8,4096,256,4,4;4096,8,8,4,4;2048,16,16,4,4;1024,32,32,4,8"


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
  """'batch,queries,keys,heads,dim;...' -> tuples."""
  shapes = []
  for part in text.split(";"):
    values = tuple(int(v) for v in part.split(",") if v.strip())
    if len(values) != 5 or min(values) < 1:
      raise SystemExit(f"--shapes: {part!r} is not batch,queries,keys,heads,dim")
    shapes.append(values)
  return shapes


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                      help="';'-separated batch,queries,keys,heads,dim")
  parser.add_argument("--impls", default="heads_major,unrolled",
                      help="comma list of attention.IMPLEMENTATIONS; the first is the reference")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--tag", default="", help="added to the results file's name")
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  args = parser.parse_args(argv)
  impls = [i for i in args.impls.split(",") if i]
  unknown = [i for i in impls if i not in attention.IMPLEMENTATIONS]
  if unknown:
    parser.error(f"unknown --impls {unknown}: choose from {attention.IMPLEMENTATIONS}")
  out = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "repeats": args.repeats, "rows": []}
  rng = np.random.default_rng(0)
  for b, lq, lk, heads, dim in parse_shapes(args.shapes):
    q = jnp.asarray(rng.standard_normal((b, lq, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, lk, heads, dim)), jnp.float32) for _ in "kv")
    runs, rows, reference = [], [], None
    for impl in impls:
      if impl == "unrolled" and lk > attention.UNROLLED_MOST_KEYS:  # attend would not unroll
        print(f"[{b}, {lq} queries, {lk} keys, {heads} heads, {dim}] unrolled: not timed "
              f"(more than {attention.UNROLLED_MOST_KEYS} keys: heads_major's program)")
        continue
      forward = lambda q, k, v, impl=impl: attention.attend(q, k, v, impl)
      gradient = jax.grad(lambda q, k, v, f=forward: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
      fwd = aot_timing.compile_and_time(forward, (q, k, v), 0)
      grad = aot_timing.compile_and_time(gradient, (q, k, v), 0)
      if reference is None:
        reference = fwd.outputs
      rows.append({"shape": [b, lq, lk, heads, dim], "impl": impl,
                   "max_abs_difference": float(jnp.max(jnp.abs(fwd.outputs - reference)))})
      runs += [(fwd.compiled, (q, k, v)), (grad.compiled, (q, k, v))]
    medians = aot_timing.time_interleaved(runs, args.repeats)
    for i, row in enumerate(rows):
      row["forward_ms"], row["gradient_ms"] = (m * 1e3 for m in medians[2 * i:2 * i + 2])
      print(f"[{b}, {lq} queries, {lk} keys, {heads} heads, {dim}] {row['impl']:12s} "
            f"forward {row['forward_ms']:8.2f} ms  gradient {row['gradient_ms']:8.2f} ms  "
            f"|diff| {row['max_abs_difference']:.1e}", flush=True)
    out["rows"] += rows
  name = "attention_forms" + (f"-{args.tag}" if args.tag else "")
  path = result_files.results_path(name, out["device"], args.out_dir)
  result_files.write_json(path, out)


if __name__ == "__main__":
  main()
