"""Launch parameters of the fused spatial attention (stt_jax/models/fused_attention.py):
forward and forward+gradient time of each, against XLA's attention.

  python3 bench/fused_attention_tune.py [--shape=16,25600,256,4,9] [--dtype=bfloat16]

Default shape: one level-1 chunk of the paper's STT-UNET step (32x320x320,
batch 2, chunks 4: 16 slices of 160x160 queries, 256 pooled keys, 4 heads of
dim 9), whose backward took 5.25 ms a call on an H200 against the forward's
0.88 ms (README, "On one H200"). Tries forward tiles x warps with the default
backward, then the backward's variants with the best forward; each
variant's outputs and gradients are compared with the default's (launch
parameters must not change the function). The backward sweep has two
rounds: each backward design (fused_attention.BACKWARDS) x query block, at the
default warps and runs; then warps x runs for the fastest of those. Writes
bench/results/fused_attention_tune-<device>.json, best first. Off a GPU the
kernels run in Pallas' interpreter: numbers, not speed (use a small --shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from stt_jax.models import fused_attention  # noqa: E402


def _max_difference(a, b) -> float:
  """Largest |a - b| over all leaves, relative to b's largest entry."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  scale = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in lb)
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(la, lb)) / scale


def programs(tuning, probe):
  """(forward, forward + gradient) of the fused attention under `tuning`."""
  forward = lambda q, k, v: fused_attention.fused_attention(q, k, v, tuning=tuning)
  loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32) * probe)
  return forward, jax.value_and_grad(loss, argnums=(0, 1, 2))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="16,25600,256,4,9",
                      help="batch,queries,keys,heads,dim")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--forward-tiles", default="4096,8192,16384,32768")
  parser.add_argument("--backward-tiles", default="4096,8192,16384")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--max-runs", default="16,64,256")
  parser.add_argument("--backwards", default=",".join(fused_attention.BACKWARDS),
                      help="backward designs to try (Tuning.backward)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  args = parser.parse_args(argv)
  designs = [d for d in args.backwards.split(",") if d]
  unknown = set(designs) - set(fused_attention.BACKWARDS)
  if unknown:
    parser.error(f"--backwards {sorted(unknown)}: one of {fused_attention.BACKWARDS}")
  b, nq, nk, heads, dim = (int(v) for v in args.shape.split(","))
  ints = lambda text: [int(v) for v in text.split(",") if v]
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), args.dtype)
             for s in ((b, nq, heads, dim), (b, nk, heads, dim), (b, nk, heads, dim)))
  probe = jnp.asarray(rng.standard_normal((b, nq, heads, dim)), jnp.float32)
  if not fused_attention.supported(q.shape, k.shape):
    parser.error(f"the fused attention does not take q {q.shape}, k {k.shape}")
  operands = (q, k, v)
  out = {"device": jax.devices()[0].device_kind, "shape": [b, nq, nk, heads, dim],
         "dtype": args.dtype, "rows": []}
  path = result_files.results_path("fused_attention_tune", out["device"], args.out_dir)

  def save():
    out["rows"].sort(key=lambda r: (r["pass"], r["step_s"]))
    result_files.write_json(path, out, quiet=True)  # after every variant: a cut run keeps its rows

  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  xla_grad = jax.value_and_grad(
      lambda q, k, v: jnp.sum(xla(q, k, v).astype(jnp.float32) * probe), argnums=(0, 1, 2))
  for name, fn in (("forward", xla), ("forward+gradient", xla_grad)):
    timed = aot_timing.compile_and_time(fn, operands, args.repeats)
    out["xla_" + name] = {"step_s": timed.step_s, "compile_s": timed.compile_s}
    print(f"xla {name}: {timed.step_s * 1e3:.3f} ms (compile {timed.compile_s:.1f} s)",
          flush=True)

  default_forward, default_grad = programs(fused_attention.DEFAULT_TUNING, probe)
  reference = {"forward": jax.jit(default_forward)(*operands),
               "forward+gradient": jax.jit(default_grad)(*operands)}

  def trial(pass_, tuning):
    fn = programs(tuning, probe)[0 if pass_ == "forward" else 1]
    try:
      timed = aot_timing.compile_and_time(fn, operands, args.repeats)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{pass_} {tuning}: failed: {str(e).splitlines()[0][:200]}", flush=True)
      return None
    row = {"pass": pass_, "tuning": tuning.__dict__, "step_s": timed.step_s,
           "compile_s": timed.compile_s,
           "difference_to_default": _max_difference(timed.outputs, reference[pass_])}
    out["rows"].append(row)
    save()
    print(f"{pass_} {tuning}: {timed.step_s * 1e3:.3f} ms, compile {timed.compile_s:.1f} s, "
          f"differs from the default by {row['difference_to_default']:.1e}", flush=True)
    return row

  base = fused_attention.DEFAULT_TUNING
  forward_rows = [trial("forward", dataclasses.replace(base, forward_tile=tile,
                                                      forward_warps=warps))
                  for tile, warps in itertools.product(ints(args.forward_tiles), ints(args.warps))]
  good = [r for r in forward_rows if r]
  best = min(good, key=lambda r: r["step_s"])["tuning"] if good else base.__dict__
  base = dataclasses.replace(base, forward_tile=best["forward_tile"],
                             forward_warps=best["forward_warps"])
  first = [trial("forward+gradient", dataclasses.replace(base, backward=design,
                                                         backward_tile=tile))
           for design, tile in itertools.product(designs, ints(args.backward_tiles))]
  good = [r for r in first if r]
  if good:
    fastest = min(good, key=lambda r: r["step_s"])["tuning"]
    base = dataclasses.replace(base, backward=fastest["backward"],
                               backward_tile=fastest["backward_tile"])
  for warps, runs in itertools.product(ints(args.warps), ints(args.max_runs)):
    if (warps, runs) != (base.backward_warps, base.max_runs):  # timed in the first round
      trial("forward+gradient", dataclasses.replace(base, backward_warps=warps,
                                                    max_runs=runs))
  save()
  for pass_ in ("forward", "forward+gradient"):
    rows = [r for r in out["rows"] if r["pass"] == pass_]
    if rows:
      print(f"best {pass_}: {rows[0]['step_s'] * 1e3:.3f} ms with {rows[0]['tuning']} "
            f"(xla {out['xla_' + pass_]['step_s'] * 1e3:.3f} ms)")
  result_files.announce(path)


if __name__ == "__main__":
  main()
