"""XLA:CPU with and without YNNPACK's reductions: whole-model step times, one process.

  PYTHONPATH=. .venv/bin/python -u bench/ynn_reductions.py            # binned VNC III widths
  PYTHONPATH=. .venv/bin/python -u bench/ynn_reductions.py --presets=baseline --rounds=10

jaxlib 0.10 hands XLA:CPU's reductions to YNNPACK unless
--xla_cpu_experimental_ynn_fusion_type drops "reduce" (stt_jax/backend.py's
CPU default since session 46). This script runs under jaxlib's own set minus
the convolutions (its $XLA_FLAGS are replaced by
`…=-individual_convolution`), compiles each program twice, once as that
process would and once with XLA's per-compile option leaving YNNPACK only the
matrix products (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`: the session-46
default), and times all programs round-robin (bench/aot_timing.py), so the
machine's drift lands on both alike. Programs: configs/mitoem_r.py's presets
with --override applied (default: the binned VNC III recipe's widths 12-48,
GroupNorm, float32), forward (mean output) and forward + gradient (the loss of
bench/attention_impl.py), on random [batch, *patch, 1] inputs. Prints medians
and the ratio (with / without), writes bench/results/ynn_reductions-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

from stt_jax import backend  # noqa: E402
if __name__ == "__main__":  # before JAX starts; not in a process that imports this
  # jaxlib's library fusions but the convolutions (session 39's CPU default),
  # whatever the environment says: the "with" side of the comparison
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith(backend.YNN_FUSION_FLAG)]
      + [f"{backend.YNN_FUSION_FLAG}=-individual_convolution"])
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import aot_timing  # noqa: E402
import attention_impl  # noqa: E402  the model loss and parameters it times
from config_overrides import apply_overrides  # noqa: E402
import mitoem_r  # noqa: E402
import result_files  # noqa: E402
from stt_jax.models import unet  # noqa: E402

# the per-compile form of "no YNNPACK reductions": the option takes one value
WITHOUT_REDUCTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
DEFAULT_OVERRIDES = ["model.widths=(12,16,24,32,48)", "model.norm=group",
                     "model.compute_dtype=float32"]


def programs(preset: str, overrides, patch, batch: int):
  """(params, {"forward": fn, "gradient": fn}) of the preset's model."""
  cfg = mitoem_r.get_config(preset)
  apply_overrides(cfg, overrides)
  model = unet.from_config(cfg.model)
  image = jnp.asarray(np.random.default_rng(0).random((batch, *patch, 1), np.float32))
  return attention_impl.perturbed_params(model, patch), {
      "forward": lambda p: jnp.mean(model.apply({"params": p}, image)),
      "gradient": jax.value_and_grad(attention_impl.sigmoid_square_loss(model, image))}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="stt,baseline", help="comma list of mitoem_r presets")
  parser.add_argument("--patch", default="4,128,128")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--passes", default="forward,gradient")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--override", action="append", default=None, metavar="KEY=VALUE",
                      help=f"config fields (repeatable; default {DEFAULT_OVERRIDES})")
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  args = parser.parse_args(argv)
  if jax.default_backend() != "cpu":
    parser.error("YNNPACK is XLA:CPU's: run it on a CPU (JAX_PLATFORMS=cpu)")
  patch = tuple(int(v) for v in args.patch.split(","))
  overrides = DEFAULT_OVERRIDES if args.override is None else args.override
  passes = [p for p in args.passes.split(",") if p]
  if not passes or set(passes) - {"forward", "gradient"}:
    parser.error(f"--passes: forward and/or gradient, got {args.passes!r}")
  rows, runs = [], []
  for preset in [p for p in args.presets.split(",") if p]:
    params, fns = programs(preset, overrides, patch, args.batch)
    for name in passes:
      lowered = jax.jit(fns[name]).lower(params)
      for reductions, options in (("ynnpack", {}), ("xla", WITHOUT_REDUCTIONS)):
        compiled = lowered.compile(options)
        value = jax.block_until_ready(compiled(params))
        rows.append({"preset": preset, "pass": name, "reductions": reductions,
                     "value": float(jax.tree.leaves(value)[0]),
                     "ynn_fusions": compiled.as_text().count("__ynn")})
        runs.append((compiled, (params,)))
  for row, median in zip(rows, aot_timing.time_interleaved(runs, args.rounds)):
    row["ms"] = median * 1e3
  for with_, without in zip(rows[::2], rows[1::2]):
    print(f"{with_['preset']:10s} {with_['pass']:9s} YNNPACK's reductions {with_['ms']:8.1f} ms, "
          f"XLA's {without['ms']:8.1f} ms: {with_['ms'] / without['ms']:.2f}x "
          f"(outputs {with_['value']:.6f} / {without['value']:.6f})", flush=True)
  out = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ["XLA_FLAGS"],
         "patch": list(patch), "batch": args.batch, "overrides": overrides,
         "rounds": args.rounds, "rows": rows}
  path = result_files.results_path("ynn_reductions", out["device"], args.out_dir)
  result_files.write_json(path, out)


if __name__ == "__main__":
  main()
