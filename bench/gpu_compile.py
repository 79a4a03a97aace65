"""Compile a program for a GPU on a machine without one: what XLA:GPU makes of it.

  python bench/gpu_compile.py --model=stt --patch=32,320,320 --dtype=bfloat16 \\
      --attention-chunks=4 --attention-impl=pallas         # the paper's STT train step
  python bench/gpu_compile.py --program=deform --deform-shape=16,160,160,36   # one level-1 call

XLA compiles for a described GPU (compute capability, SMs, memory bandwidth:
TARGETS) without a device, through jax's CUDA plugin: the compiled HLO,
XLA's memory analysis (scratch, arguments, outputs), the compile time, and
every buffer an instruction outside a fusion writes (fusions, cuDNN and
cuBLAS calls, Triton kernels, sorts), largest first, named by module
(`ResUNet/sst_enc1/deform_fuse`, as bench/profile_step.py names profile rows).
What it cannot give is time: nothing runs. What it does give, before a GPU
lease is spent: whether a program compiles for that GPU (Triton kernels
included), how much scratch it plans, and which large intermediates reach
memory, e.g. the 2 GB gradient rows the deformable conv wrote twice per
level-1 call until session 35 (docs/architecture.md).

Needs jax's CUDA plugin matching the installed jax (not in requirements.txt;
it pulls ~4 GB of CUDA wheels): `pip install "jax[cuda13]==<jax version>"`.
Without it the script says so and stops. Writes
bench/results/gpu_compile-<program>-<device>.json (device: the target's name).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import profile_step  # noqa: E402  pylint: disable=g-import-not-at-top
import result_files  # noqa: E402  pylint: disable=g-import-not-at-top
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top
from stt_jax.models.deformable_conv import GRADIENTS  # noqa: E402

# Published figures of each GPU (SXM parts); the device kind is what jax and
# Pallas read to pick the architecture.
TARGETS = {
    "h100": dict(kind="NVIDIA H100", major=9, minor=0, sms=132, clock_ghz=1.98,
                 bandwidth=3.35e12, l2=50 * 2**20, memory=80 * 2**30),
    "h200": dict(kind="NVIDIA H200", major=9, minor=0, sms=132, clock_ghz=1.98,
                 bandwidth=4.8e12, l2=50 * 2**20, memory=141 * 10**9),
}


def target_config(name: str) -> str:
  """XLA's GpuTargetConfig (text proto) for TARGETS[name]."""
  t = TARGETS[name]
  return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {t["major"]} minor: {t["minor"]} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {t["sms"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(t["bandwidth"])}
  l2_cache_size: {t["l2"]}
  clock_rate_ghz: {t["clock_ghz"]}
  device_memory_size: {t["memory"]}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{t["kind"]}"
"""


def gpu_mesh(name: str) -> jax.sharding.Mesh:
  """A [data, model] mesh of one compile-only GPU described by TARGETS[name]."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(platform="cuda", topology_name="",
                                            topology="1x1x1",
                                            target_config=target_config(name))
  except (NotImplementedError, RuntimeError, ValueError) as e:
    raise SystemExit(f"cannot compile for a GPU here ({str(e).splitlines()[0][:120]}): "
                     f"install jax's CUDA plugin, pip install \"jax[cuda13]=={jax.__version__}\"")
  return topologies.make_mesh(topology, (1, 1), ("data", "model"))


_KEPT = 300  # buffer rows the JSON keeps (largest first); totals count every one
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|select|scatter|comparator)=%?([\w.\-]+)")
# results that are views or control flow, not buffers an instruction writes
# (an async fusion's start holds its operands too: its done is the write)
_NOT_WRITES = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while",
               "conditional", "call", "copy-start", "copy-done", "after-all",
               "partition-id", "replica-id", "iota", "fusion-start"}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO result shape, a tuple's summed: 'bf16[2,3]{1,0}' -> 12."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * functools.reduce(
          lambda a, b: a * b, (int(d) for d in dims.split(",") if d), 1)
  return total


_WHILE = re.compile(r"body=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'known_trip_count":\{"n":"(\d+)"')


def _runs_per_call(bodies: dict[str, list[str]]) -> dict[str, int]:
  """{computation: times it runs per call of the module}: 1 for the entry,
  a loop body's known trip count times its parent's (the chunked SST blocks'
  scans run their body once per chunk)."""
  loops = []  # (parent, body, trips)
  for name, lines in bodies.items():
    for line in lines:
      if " while(" in line:
        body, trips = _WHILE.search(line), _TRIP_COUNT.search(line)
        if body:
          loops.append((name, body.group(1), int(trips.group(1)) if trips else 1))
  runs = {name: 1 for name in bodies}
  for _ in range(len(loops)):  # nested loops: settle outer counts first
    for parent, body, trips in loops:
      runs[body] = runs.get(parent, 1) * trips
  return runs


def written_buffers(hlo_text: str) -> list[dict]:
  """Every instruction of a compiled module that writes memory: those of the
  entry computation and of loop bodies, not those inside a fusion (or a
  reduction's or sort's comparator), each with the bytes its result holds
  and the bytes it writes per call of the module (times its loop's known
  trip count), largest first by the latter. A dynamic-update-slice (a scan
  stacking its chunks' outputs) is flagged `in_place`: it writes only its
  update into a buffer it shares with its operand, so its `bytes` overstate
  it and the totals leave it out."""
  bodies = profile_step.computations(hlo_text)
  # a while body or condition is also named by calls-like attributes
  # (body=, condition=): those stay; what a fusion or a reduction calls goes
  inner = {name for lines in bodies.values() for line in lines
           for name in _CALLED.findall(line)}
  names = profile_step.instruction_names(hlo_text)
  runs = _runs_per_call(bodies)
  rows = []
  for computation, lines in bodies.items():
    if computation in inner:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m or m.group(3) in _NOT_WRITES:
        continue
      op_name = names.get(m.group(1), {}).get("op_name", "")
      module, pass_ = profile_step.module_of(op_name)
      size = shape_bytes(m.group(2))
      rows.append({"instruction": m.group(1), "opcode": m.group(3),
                   "computation": computation, "bytes": size,
                   "runs": runs[computation], "bytes_per_call": size * runs[computation],
                   # updates its operand's buffer in place: writes a slice, not `bytes`
                   "in_place": op_name.endswith("dynamic_update_slice"),
                   "shape": m.group(2).split("{")[0][:120], "op_name": op_name,
                   "module": module, "pass": pass_})
  return sorted(rows, key=lambda r: -r["bytes_per_call"])


def _train_program(cfg, mesh):
  """(jitted train step, abstract arguments) of cfg on mesh, as loop.build
  would build it, without creating a state."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from stt_jax.train import loop, step as step_lib  # pylint: disable=g-import-not-at-top
  setup, create = loop.components(cfg)
  shapes = jax.eval_shape(create)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, step_lib.state_shardings(shapes, mesh))
  batch_sharding = NamedSharding(mesh, P("data"))
  image, target = vs_torch._inputs(tuple(cfg.data.patch_shape), cfg.train.batch_size)  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in (("image", image), ("target", target))}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  setup = dataclasses.replace(setup, state=state, mesh=mesh)
  return setup.jit_step(cfg.loss), (state, batch, key)


def _infer_program(cfg, mesh):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  model = unet.from_config(cfg.model)
  shape = (cfg.train.batch_size, *cfg.data.patch_shape, 1)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))["params"]
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        params)
  image = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("data")))
  forward = model.clone(forward_only=True)  # as segment's windows run it
  return jax.jit(lambda p, x: jax.nn.sigmoid(forward.apply({"params": p}, x))), (params, image)


def _deform_program(shape, groups: int, dtype: str, gradient: str, mesh):
  """Forward + gradient of one deformable conv of `shape` [n, h, w, c]."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from stt_jax.models.deformable_conv import deformable_conv2d  # pylint: disable=g-import-not-at-top
  n, h, w, c = shape
  spec = lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, P()))
  loss = lambda x, o, k: jnp.sum(deformable_conv2d(
      x, o, k, gradient=gradient).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (
      spec((n, h, w, c)), spec((n, h, w, groups, 9, 2)), spec((3, 3, c, c)))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--program", default="train", choices=["train", "infer", "deform"])
  parser.add_argument("--target", default="h200", choices=sorted(TARGETS))
  parser.add_argument("--model", default="baseline", help="a preset: baseline, stt, ...")
  parser.add_argument("--patch", default="32,320,320")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--attention-chunks", type=int, default=1)
  parser.add_argument("--attention-impl", default="auto",
                      help="model.attention.implementation: auto, xla, heads_major, "
                      "cudnn or pallas")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config field for train/infer, e.g. "
                      "model.attention.deform_gradient=tap_major (repeatable)")
  parser.add_argument("--deform-shape", default="16,160,160,36", help="n,h,w,c (--program=deform)")
  parser.add_argument("--deform-groups", type=int, default=4)
  parser.add_argument("--deform-gradient", default="scatter",
                      choices=GRADIENTS,
                      help="the order of the gradient's scatter-add (--program=deform)")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--hlo", help="also write the compiled module's text here")
  parser.add_argument("--out-dir", default=result_files.RESULTS_DIR)
  args = parser.parse_args(argv)
  mesh = gpu_mesh(args.target)
  if args.program == "deform":
    shape = tuple(int(v) for v in args.deform_shape.split(","))
    fn, operands = _deform_program(shape, args.deform_groups, args.dtype, args.deform_gradient,
                                   mesh)
    order = "" if args.deform_gradient == "scatter" else f"-{args.deform_gradient}"
    stem = f"gpu_compile-deform{order}"
  else:
    patch = tuple(int(v) for v in args.patch.split(","))
    # forms chosen per platform ("auto" convs, the edge padding, the fused
    # attention's Triton or interpreter) follow the abstract GPU mesh below
    cfg, _ = vs_torch._bench_setup(patch, args.batch, args.dtype,  # pylint: disable=protected-access
                                   model=args.model, build=False,
                                   chunks=args.attention_chunks,
                                   attention_impl=args.attention_impl,
                                   overrides=args.override)
    build = _train_program if args.program == "train" else _infer_program
    fn, operands = build(cfg, mesh)
    stem = f"gpu_compile-{args.model}-{args.program}" + result_files.settings_tag(
        args.attention_impl, args.attention_chunks, args.override)
  start = time.perf_counter()
  # the abstract mesh tells Pallas which GPU its Triton kernels are for
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = fn.lower(*operands)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  memory = compiled.memory_analysis()
  rows = written_buffers(hlo)
  by_module = collections.Counter()
  written = [r for r in rows if not r["in_place"]]
  for r in written:
    by_module[(r["module"], r["pass"])] += r["bytes_per_call"]
  gib = lambda b: b / 2**30
  out = {"target": TARGETS[args.target]["kind"], "jax": jax.__version__,
         "program": args.program, "args": vars(args), "compile_s": seconds,
         "temp_gib": gib(memory.temp_size_in_bytes),
         "argument_gib": gib(memory.argument_size_in_bytes),
         "output_gib": gib(memory.output_size_in_bytes),
         "written_gib": gib(sum(r["bytes_per_call"] for r in written)),
         "in_place_buffers_gib": gib(sum(r["bytes_per_call"] for r in rows if r["in_place"])),
         "buffers": rows[:_KEPT], "buffer_count": len(rows),
         "by_module": [{"module": m, "pass": p, "gib": gib(b)}
                       for (m, p), b in by_module.most_common()]}
  print(f"{out['target']} (compiled without one): {stem[len('gpu_compile-'):]}, "
        f"compile {seconds:.0f} s; scratch {out['temp_gib']:.2f} GiB, arguments "
        f"{out['argument_gib']:.2f} GiB; buffers written per call {out['written_gib']:.1f} GiB")
  print(f"{'MiB':>7} {'runs':>4}  {'opcode':<13}{'instruction':<34}{'shape':<38}module")
  for r in written[:args.top]:
    print(f"{r['bytes'] / 2**20:>7.0f} {r['runs']:>4}  {r['opcode'][:12]:<13}"
          f"{r['instruction'][:33]:<34}{r['shape'][:37]:<38}{r['module']} ({r['pass']})")
  print("\nwritten per call, by module and pass:")
  for r in out["by_module"][:args.top]:
    print(f"{r['gib']:>9.2f} GiB  {r['pass']:<9}{r['module']}")
  path = result_files.results_path(stem, out["target"], args.out_dir)
  result_files.write_json(path, out, indent=1)


if __name__ == "__main__":
  main()
