"""Where a train step (or forward pass) spends its time: the top operations.

  .venv/bin/python bench/profile_step.py                          # baseline train step, CPU
  python bench/profile_step.py --model=stt --patch=32,320,320 --dtype=bfloat16   # on a GPU

Runs the program of bench/vs_torch.py (same model presets, loss and inputs)
under `jax.profiler.trace` (Perfetto trace), sums the device-side events by
the XLA instruction that ran them, and names each instruction by what JAX
lowered into it (the `op_name` metadata of the compiled HLO: module path and
primitive, e.g. `.../enc1/residual/conv1/conv_general_dilated`). Prints the top
operations, the time per primitive (convolution, attention, gather, ...) and
per module and pass (`ResUNet/sst_enc1/deform_fuse`, backward), and writes
bench/results/profile-<model>-<kind>-<device>.json (every instruction's row
under "all", for questions the printed tables do not answer).

On a GPU, XLA's command buffers (CUDA graphs) are switched off for the
profile (`--xla_gpu_enable_command_buffer=`, unless XLA_FLAGS already sets
it or --keep-command-buffers): inside one, every kernel is tagged with the
buffer's thunk (`command_buffer_1071`), which the compiled HLO does not name,
so the H200 profile of session 33 left 60 % of the step unattributed. The
kernels' own times are the same either way; launch gaps are not counted.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402

import result_files  # noqa: E402  pylint: disable=g-import-not-at-top
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top

# events that wrap others (would count the same time twice)
_WRAPPERS = re.compile(r"ThunkExecutor|Execute|wait for|^\$|PjRt|XlaModule|jit_")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_HEAVY = ("convolution", "dot", "custom-call", "gather", "scatter", "reduce-window")


def computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation: its lines} of a compiled module's text, in order."""
  out, current = {}, None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c and " = " not in line:
      current = c.group(1)
      out[current] = []
    elif current is not None:
      out[current].append(line)
  return out


_LOOP_PARTS = re.compile(r"\b(?:body|condition)=%?([\w.\-]+)")
_CALLED_PARTS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")


def _call_sites(comps: dict[str, list[str]]) -> dict[str, tuple[str, str, bool]]:
  """{computation: (the computation calling it, the caller's op_name, whether
  the caller is a while loop)}."""
  sites = {}
  for parent, lines in comps.items():
    for line in lines:
      op = _OP_NAME.search(line)
      op_name = op.group(1) if op else ""
      is_loop = " while(" in line
      for name in (_LOOP_PARTS if is_loop else _CALLED_PARTS).findall(line):
        sites.setdefault(name, (parent, op_name, is_loop))
  return sites


def _renamer(comps: dict[str, list[str]]):
  """op_name, computation -> the op_name as its call site names it.

  JAX lowers a function traced twice with the same shapes (the two level-1
  SST blocks' chunk loops, enc1 and dec1) once; XLA then clones the loop body
  for each call, and every clone keeps the first site's metadata
  (`.../sst_enc1/sst_enc1._fuse/while/body/...` inside dec1's loop). The
  while instruction itself carries its own site's op_name, so a loop body's
  names are rebuilt on it: the part up to the loop's `while` comes from the
  caller, the rest (`body/...`) from the instruction."""
  sites, anchors = _call_sites(comps), {}

  def anchor(computation: str) -> tuple[list[str], int] | None:
    """(the calling while's op_name, split; how many `while` parts it has)."""
    if computation not in anchors:
      anchors[computation] = None  # a cycle, if any, ends here
      site = sites.get(computation)
      if site is not None:
        parent, op_name, is_loop = site
        if is_loop and op_name.split("/")[-1] == "while":
          parts = rename(op_name, parent).split("/")
          anchors[computation] = (parts, parts.count("while"))
        else:  # a fusion, a call, a while XLA made from one instruction: as its caller's
          anchors[computation] = anchor(parent)
    return anchors[computation]

  def rename(op_name: str, computation: str) -> str:
    found = anchor(computation) if op_name else None
    if found is None:
      return op_name
    parts, loops = found
    inner = op_name.split("/")
    at = [i for i, part in enumerate(inner) if part == "while"]
    if len(at) < loops:
      return op_name
    return "/".join(parts + inner[at[loops - 1] + 1:])

  return rename


def instruction_names(hlo_text: str) -> dict[str, dict]:
  """{instruction: {"opcode", "op_name"}} of a compiled module's text. A
  fusion without metadata of its own is named by the heaviest instruction it
  calls (a convolution, dot, custom call, ...), else by its first named one.
  Inside a loop body the names are those of the loop's own call site
  (_renamer)."""
  out, calls, bodies, where = {}, {}, collections.defaultdict(list), {}
  comps = computations(hlo_text)
  for current, lines in comps.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      op = _OP_NAME.search(line)
      out[m.group(1)] = {"opcode": m.group(2), "op_name": op.group(1) if op else ""}
      where[m.group(1)] = current
      bodies[current].append(out[m.group(1)])
      called = _CALLS.search(line)
      if called:
        calls[m.group(1)] = called.group(1)
  for name, info in out.items():
    if not info["op_name"] and name in calls:
      body = bodies.get(calls[name], [])
      named = [i for i in body if i["op_name"]]
      heavy = [i for i in named if i["opcode"] in _HEAVY]
      if heavy or named:
        info["op_name"] = (heavy or named)[0]["op_name"]
      else:  # e.g. a weight-gradient convolution: XLA kept no metadata
        unnamed = [i["opcode"] for i in body if i["opcode"] in _HEAVY]
        if unnamed:
          info["op_name"] = f"({unnamed[0]} without metadata, in {calls[name]})"
          info["opcode"] = unnamed[0]
  # renamed last, each by the computation it runs in: a fusion named through
  # its body takes its own call site's loop
  rename = _renamer(comps)
  for name, info in out.items():
    if not info["op_name"].startswith("("):
      info["op_name"] = rename(info["op_name"], where[name])
  return out


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_ALIASES = {"conv_general_dilated": "convolution", "dot_general": "dot",
            "dot_product_attention": "attention"}


def primitive(op_name: str, opcode: str) -> str:
  """The JAX primitive an instruction came from (the op_name's last part); a
  collective by its opcode (XLA merges the gradients' all-reduces into one
  whose op_name lists every primitive it came from)."""
  if opcode in _COLLECTIVES:
    return opcode
  last = "" if not op_name or op_name.startswith("(") else op_name.rsplit("/", 1)[-1]
  last = re.sub(r"\[.*$", "", last)
  last = re.sub(r"^p?jit\((\w+)\)$", r"\1", last).rstrip(")") or opcode
  return _ALIASES.get(last, last)


_MODEL = re.compile(r"^(?:\w+\()*([A-Z]\w*)\)*$")  # ResUNet, jvp(ResUNet), transpose(jvp(...))
_PLUMBING = re.compile(r"[.(]|^(?:while|body|cond|checkpoint|remat|eval_jaxpr|rem|scan|closed_call|"
                       r"core_call|custom_jvp_call|custom_vjp_call|pjit)$")


def module_of(op_name: str) -> tuple[str, str]:
  """(module, pass) an instruction belongs to: the model's top-level child and
  the first module inside it (`ResUNet/sst_enc1/deform_fuse`), skipping
  plumbing (while loops, checkpoints, vmaps, `x._fuse` methods); pass
  "backward" under autodiff's transpose (with the remat's recomputed forward),
  else "forward". Work outside any module (loss, optimizer) is
  "(outside the model)"; an instruction without metadata "(unnamed)"."""
  if not op_name or op_name.startswith("("):
    return "(unnamed)", "?"
  parts = op_name.split("/")
  pass_ = "backward" if "transpose(" in op_name else "forward"
  for i, part in enumerate(parts[:-1]):
    m = _MODEL.match(part)
    if m:
      inner = [p for p in parts[i + 1:-1] if not _PLUMBING.search(p)]
      return "/".join([m.group(1)] + inner[:2]), pass_
  return "(outside the model)", pass_


def device_events(trace: dict) -> list[dict]:
  """Complete events of the device tracks: GPU/TPU streams where there are
  any, else the host events XLA:CPU tags with the instruction they ran
  (`args.hlo_op`), on whichever thread ran them: the PjRt client threads run
  kernels as well as the Eigen pool. Each event's `dur` becomes its self time
  (its own time less that of events nested in it on the same thread, e.g. a
  while loop's body), so nothing is counted twice."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in pids.items() if "/device:" in n and "CPU" not in n}
  keep = []
  for e in events:
    if e.get("ph") != "X" or _WRAPPERS.search(e.get("name", "")):
      continue
    if device:
      if e["pid"] in device:
        keep.append(dict(e))
    elif (e.get("args") or {}).get("hlo_op"):
      keep.append(dict(e))
  return _self_times(keep)


def _self_times(events: list[dict]) -> list[dict]:
  """Sets each event's `dur` to its time outside the events nested in it."""
  by_track = collections.defaultdict(list)
  for e in events:
    e.setdefault("dur", 0.0)
    by_track[(e["pid"], e["tid"])].append(e)
  for track in by_track.values():
    track.sort(key=lambda e: (e["ts"], -e["dur"]))
    enclosing: list[tuple[float, dict]] = []  # (end, event), innermost last
    for e in track:
      while enclosing and e["ts"] >= enclosing[-1][0]:
        enclosing.pop()
      if enclosing:  # e's whole time is inside its parent's
        enclosing[-1][1]["dur"] -= e["dur"]
      enclosing.append((e["ts"] + e["dur"], e))
  return events


def summarize(events: list[dict], names: dict[str, dict], steps: int, top: int,
              wall_ms_per_step: float | None = None) -> dict:
  """Device time per instruction, primitive and module, per step. With the
  step's wall time: also the time in no instruction's event (on a GPU, the
  device idle between kernels; on a CPU mostly XLA's Eigen convolutions,
  which run asynchronously on the Eigen pool: their events end when the
  work is handed over, not when it is done)."""
  by_op = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    key = (e.get("args") or {}).get("hlo_op") or e["name"]
    by_op[key][0] += e.get("dur", 0.0) / 1e3
    by_op[key][1] += 1
  total = sum(v[0] for v in by_op.values()) or 1.0
  rows = []
  for op, (ms, calls) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
    info = names.get(op, {"opcode": "?", "op_name": ""})
    rows.append({"instruction": op, "opcode": info["opcode"], "op_name": info["op_name"],
                 "primitive": primitive(info["op_name"], info["opcode"]),
                 "ms_per_step": ms / steps, "share": ms / total, "calls_per_step": calls / steps})
  by_primitive, by_module = collections.Counter(), collections.Counter()
  for r in rows:
    by_primitive[r["primitive"]] += r["ms_per_step"]
    by_module[module_of(r["op_name"])] += r["ms_per_step"]
  timing = {}
  if wall_ms_per_step is not None:
    timing = {"wall_ms_per_step": wall_ms_per_step,
              "unattributed_ms_per_step": max(0.0, wall_ms_per_step - total / steps)}
  return {"device_ms_per_step": total / steps, **timing, "top": rows[:top], "all": rows,
          "by_primitive": [{"primitive": p, "ms_per_step": ms, "share": ms * steps / total}
                           for p, ms in by_primitive.most_common()],
          "by_module": [{"module": m, "pass": p, "ms_per_step": ms, "share": ms * steps / total}
                        for (m, p), ms in by_module.most_common()]}


def without_command_buffers(xla_flags: str) -> str:
  """XLA_FLAGS with GPU command buffers off, unless the flags already say.
  Read when the backend starts, so it must be set before the first device use."""
  if "xla_gpu_enable_command_buffer" in xla_flags:
    return xla_flags
  return (xla_flags + " --xla_gpu_enable_command_buffer=").strip()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="baseline", help="a preset: baseline, stt, ...")
  parser.add_argument("--kind", default="train", choices=["train", "infer"])
  parser.add_argument("--patch", default="8,64,64")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention-chunks", type=int, default=1)
  parser.add_argument("--attention-impl", default="auto",
                      help="model.attention.implementation: auto, xla, heads_major, "
                      "cudnn or pallas")
  parser.add_argument("--steps", type=int, default=3, help="steps traced")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--keep-command-buffers", action="store_true",
                      help="leave XLA's GPU command buffers on (their kernels then go "
                      "unnamed)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override (repeatable), as bench/vs_torch.py takes it, "
                      "e.g. model.norm=group; the JSON's name gains it")
  args = parser.parse_args()
  if not args.keep_command_buffers:
    os.environ["XLA_FLAGS"] = without_command_buffers(os.environ.get("XLA_FLAGS", ""))
  patch = tuple(int(v) for v in args.patch.split(","))
  from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg, setup = vs_torch._bench_setup(patch, args.batch, args.dtype, model=args.model,  # pylint: disable=protected-access
                                     chunks=args.attention_chunks,
                                     attention_impl=args.attention_impl,
                                     overrides=tuple(args.override))
  image, target = vs_torch._inputs(patch, args.batch)  # pylint: disable=protected-access
  batch = step_lib.shard_batch({"image": image, "target": target}, setup.mesh)
  if args.kind == "train":
    fn = setup.jit_step(cfg.loss)
    key = jax.random.key_data(jax.random.key(0))
    holder = {"state": setup.state}
    hlo = fn.lower(setup.state, batch, key).compile().as_text()

    def one():
      holder["state"], metrics = fn(holder["state"], batch, key)
      return metrics["loss"]
  else:
    fn = vs_torch._forward_fn(setup)  # pylint: disable=protected-access
    hlo = fn.lower(setup.state.params, batch["image"]).compile().as_text()

    def one():
      return fn(setup.state.params, batch["image"])
  jax.block_until_ready(one())
  jax.block_until_ready(one())
  walls = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(one())
    walls.append((time.perf_counter() - start) * 1e3)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        jax.block_until_ready(one())
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      raise SystemExit("the profiler wrote no Perfetto trace")
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  result = summarize(device_events(trace), instruction_names(hlo), args.steps, args.top,
                     wall_ms_per_step=min(walls))
  device = jax.devices()[0]
  result.update(device=device.device_kind, jax=jax.__version__, model=args.model, kind=args.kind,
                patch=list(patch), batch=args.batch, dtype=args.dtype,
                attention_chunks=args.attention_chunks, attention_impl=args.attention_impl,
                overrides=list(args.override), xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(f"{device.device_kind}: {args.model} {args.kind} {args.patch} x{args.batch} {args.dtype}, "
        f"{result['device_ms_per_step']:.1f} ms of device events per step; the step "
        f"{result['wall_ms_per_step']:.1f} ms wall (fastest of {args.steps} untraced), "
        f"{result['unattributed_ms_per_step']:.1f} ms in no event"
        + (" (XLA:CPU's Eigen convolutions run asynchronously: their time is mostly "
           "there)" if device.platform == "cpu" else ""))
  print(f"{'ms/step':>9}{'share':>7}{'calls':>6}  {'instruction':<28}op (module path / primitive)")
  for r in result["top"]:
    print(f"{r['ms_per_step']:>9.2f}{r['share']:>7.1%}{r['calls_per_step']:>6.0f}  "
          f"{r['instruction'][:27]:<28}{r['op_name'][-70:] or r['opcode']}")
  print("\nby primitive:")
  for r in result["by_primitive"][:10]:
    print(f"{r['ms_per_step']:>9.2f}{r['share']:>7.1%}  {r['primitive']}")
  print("\nby module (model's child / first module in it) and pass:")
  for r in result["by_module"][:args.top]:
    print(f"{r['ms_per_step']:>9.2f}{r['share']:>7.1%}  {r['pass']:<9}{r['module']}")
  impl = "" if args.attention_impl == "auto" else f"-attention_{args.attention_impl}"
  impl += result_files.override_tag(args.override)
  out = result_files.results_path(f"profile-{args.model}-{args.kind}{impl}", device.device_kind)
  result_files.write_json(out, result)


if __name__ == "__main__":
  main()
