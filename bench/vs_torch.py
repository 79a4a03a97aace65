"""stt_jax against its PyTorch peer (bench/reference_torch) on this machine.

  .venv/bin/python bench/vs_torch.py                 # train and inference, then ratios
  .venv/bin/python bench/train_throughput.py         # train step only
  .venv/bin/python bench/infer_throughput.py         # forward (inference windows) only
  ... --cases=small                                  # small patch only
  (defaults: paper and small on a GPU; tiny, 8x64x64, and float32 on a CPU,
  where a paper-width train step at 16x128x128 takes ~45 s)
  ... --models=baseline,stt                          # which networks (both by default)

Each framework runs in its own subprocess (clean peak-memory counters, no
allocator fighting the other). Rows: voxels/s, step time (median of
--repeats), compile time (first call), peak device memory, and for ours the
FLOPs per step from XLA's cost analysis of the lowered program and the model
FLOPs utilisation (MFU) against the device's bf16 peak (spec sheet, and the
8192^3 bf16 matmul rate measured in the same process). PyTorch runs eager and
`torch.compile`d, channels-last, bf16 through autocast. Before timing, the
peer's output on our converted weights is checked against ours (float32,
highest precision). Models: "baseline" (Res-UNET-R, bench/reference_torch/
res_unet.py) and "stt" (the STT-UNET preset: SST blocks with deformable fusion
and the denoiser, bench/reference_torch/stt_unet.py); both train on the
original's weighted BCE alone. A row that runs out of device memory is
recorded as such and the others go on. JSON goes to
bench/results/vs_torch-<kinds>[-<models>]-<device>.json, rewritten after
every row (workers send each row as it is measured), so a run cut short by a
time limit keeps what it finished. FLOPs are counted last (~40 s on a CPU);
under a tight limit pass --flops=skip and fill them in anywhere later with
--add-flops <json>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import result_files  # bench/, beside this file
from config_overrides import apply_overrides  # bench/, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the driver and both workers share one GPU: allocate on demand, not 75% up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
from stt_jax import backend  # noqa: E402  pylint: disable=g-import-not-at-top
backend.apply_default_xla_flags()  # the XLA flags a run gets; the workers inherit them

BASELINE = (28, 36, 48, 64, 80)
MODELS = ("baseline", "stt")  # stt_jax presets; the peer builds the same network
# model.attention.chunks of our timed programs (--attention-chunks); FLOPs are
# always counted on the unchunked program (same function, no recompute)
ATTENTION_CHUNKS = 1
# model.attention.implementation of our timed programs (--attention-impl);
# FLOPs are counted on XLA's attention (the model's FLOPs, whatever runs them)
ATTENTION_IMPL = "auto"
# more config overrides of our timed programs, "key=value" (--override)
OVERRIDES: tuple[str, ...] = ()
# (name, patch, batch per device)
CASES = {"train": {"paper": ((32, 320, 320), 2), "small": ((16, 128, 128), 2),
                   "tiny": ((8, 64, 64), 2)},
         "infer": {"paper": ((32, 256, 256), 2), "small": ((16, 128, 128), 2),
                   "tiny": ((8, 64, 64), 2)}}
# dense bf16 tensor-core peak of the spec sheet, FLOP/s
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "MI250X": 383e12}


def _spec_peak(kind: str) -> float | None:
  return next((v for k, v in BF16_PEAK.items() if k in kind), None)


def _median_time(fn, sync, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def _inputs(patch, batch, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  image = rng.random((batch, *patch, 1), dtype=np.float32)
  target = (rng.random((batch, *patch, 2)) < 0.1).astype(np.float32)
  return image, target


# ----------------------------------------------------------------- ours (JAX)

def _bench_setup(patch, batch: int, dtype: str, conv_impl: str = "auto", devices=None,
                 model: str = "baseline", build: bool = True, chunks: int = 1,
                 attention_impl: str = "auto", overrides=()):
  """(cfg, loop.Setup or None) of `model` (a preset) at the paper's training
  settings; the loss is the original's weighted BCE alone (dice weight 0), as
  the peer's; then `overrides` ("key=value"), checked as stt_jax.main checks
  a config."""
  from stt_jax.config import default_config  # pylint: disable=g-import-not-at-top
  from stt_jax.presets import apply_preset  # pylint: disable=g-import-not-at-top
  from stt_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = apply_preset(default_config(), model)
  cfg.model.widths = BASELINE
  cfg.model.compute_dtype = dtype
  cfg.model.conv_impl = conv_impl
  cfg.data.patch_shape = tuple(patch)
  cfg.train.batch_size = batch
  cfg.loss.dice_weight = 0.0
  cfg.model.attention.chunks = chunks
  cfg.model.attention.implementation = attention_impl
  apply_overrides(cfg, overrides)  # a bad value fails here, not after the peer's run
  return cfg, (loop.build(cfg, devices=devices) if build else None)


def _forward_fn(setup):
  """Jitted inference: (params, image) -> sigmoid probabilities."""
  import jax  # pylint: disable=g-import-not-at-top
  model = setup.model.clone(forward_only=True)  # as segment's windows run it
  return jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))


def _out_of_memory(error: Exception) -> bool:
  text = f"{type(error).__name__} {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory"))


def _oom_row(framework, mode, kind, case, patch, batch, dtype, model, error) -> dict:
  print(f"  {framework} {mode} {model} {kind} {case} {dtype}: out of device memory", flush=True)
  return {"framework": framework, "mode": mode, "model": model, "kind": kind, "case": case,
          "patch": list(patch), "batch": batch, "dtype": dtype, "error": "out of memory",
          "detail": str(error).splitlines()[0][:300]}


def _jax_worker(kind: str, cases, dtypes, repeats: int, model: str = "baseline") -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  n = jax.device_count()
  matmul_peak = None
  if device.platform != "cpu":
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    matmul_peak = 2 * 8192 ** 3 / _median_time(lambda: mm(a).block_until_ready(),
                                               lambda: None, 10)
  rows = []
  for case in cases:
    patch, per_device = CASES[kind][case]
    for dtype in dtypes:
      try:
        row = _jax_row(kind, case, patch, per_device, n, dtype, model, repeats,
                       device, matmul_peak)
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e):
          raise
        row = _oom_row("jax", "jit", kind, case, patch, per_device * n, dtype, model, e)
      rows.append(row)
  return {"device": device.device_kind, "platform": device.platform, "devices": n,
          "jax": jax.__version__, "matmul_bf16_flops": matmul_peak, "rows": rows}


def _jax_row(kind, case, patch, per_device, n, dtype, model, repeats, device,
             matmul_peak) -> dict:
  """One timed row of ours (its setup is released when it returns)."""
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg, setup = _bench_setup(patch, per_device * n, dtype, model=model, chunks=ATTENTION_CHUNKS,
                            attention_impl=ATTENTION_IMPL, overrides=OVERRIDES)
  image, target = _inputs(patch, per_device * n)
  batch = step_lib.shard_batch({"image": image, "target": target}, setup.mesh)
  if kind == "infer":
    fn = _forward_fn(setup)
    args = (setup.state.params, batch["image"])
    flops = fn.lower(*args).cost_analysis()
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    compile_s = time.perf_counter() - t0
    step_s = _median_time(lambda: fn(*args).block_until_ready(), lambda: None, repeats)
  else:
    step_fn = setup.jit_step(cfg.loss)
    key = jax.random.key_data(jax.random.key(0))
    flops = step_fn.lower(setup.state, batch, key).cost_analysis()
    holder = {"state": setup.state}

    def one():
      holder["state"], metrics = step_fn(holder["state"], batch, key)
      return metrics["loss"]
    t0 = time.perf_counter()
    one().block_until_ready()
    compile_s = time.perf_counter() - t0
    step_s = _median_time(lambda: one().block_until_ready(), lambda: None, repeats)
  flops = (flops[0] if isinstance(flops, (list, tuple)) else flops or {}).get("flops")
  if ATTENTION_CHUNKS > 1 or ATTENTION_IMPL not in ("auto", "xla"):
    flops = None  # a scan's body is counted once, a kernel not at all: add_flops recounts
  stats = device.memory_stats() or {}
  voxels = per_device * n * int(__import__("numpy").prod(patch))
  row = {"framework": "jax", "mode": "jit", "model": model, "kind": kind, "case": case,
         "patch": list(patch), "batch": per_device * n, "dtype": dtype,
         "step_s": step_s, "voxels_per_s": voxels / step_s, "compile_s": compile_s,
         "peak_device_bytes": stats.get("peak_bytes_in_use"),
         "attention_chunks": ATTENTION_CHUNKS, "attention_impl": ATTENTION_IMPL}
  if OVERRIDES:
    row["overrides"] = list(OVERRIDES)
  if flops:
    row["flops_per_step"] = float(flops)
    row["flops_per_voxel"] = float(flops) / voxels
    spec = _spec_peak(device.device_kind)
    if spec:
      row["mfu_spec"] = flops / step_s / (spec * n)
    if matmul_peak:
      row["mfu_measured_matmul"] = flops / step_s / (matmul_peak * n)
  print(f"  jax {model} {kind} {case} {dtype}: {step_s * 1e3:.1f} ms/step, "
        f"{row.get('flops_per_step', 0) / 1e12:.2f} TFLOP/step, MFU "
        f"{100 * row.get('mfu_spec', 0):.1f}% of spec, "
        f"{100 * row.get('mfu_measured_matmul', 0):.1f}% of measured matmul", flush=True)
  return row


def _program_flops(kind: str, patch, batch: int, dtype: str, model: str = "baseline",
                   overrides=()) -> float:
  """FLOPs of our jitted program from XLA's cost analysis of the lowered
  (unoptimised, backend-independent) HLO: on CPU it has convolutions as
  convolutions; some GPU builds return no analysis for the lowered program.
  `overrides` as the row ran them, but native 3D convs whatever its
  model.conv_impl: the model's FLOPs, not those of a CPU's form of them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  overrides = [o for o in overrides if not o.startswith("model.conv_impl=")]
  cfg, setup = _bench_setup(patch, batch, dtype, conv_impl="native",
                            devices=jax.devices()[:1], model=model, overrides=overrides)
  image = jax.ShapeDtypeStruct((batch, *patch, 1), np.float32)
  if kind == "infer":
    analysis = _forward_fn(setup).lower(setup.state.params, image).cost_analysis()
  else:
    target = jax.ShapeDtypeStruct((batch, *patch, 2), np.float32)
    key = jax.ShapeDtypeStruct((2,), np.uint32)
    analysis = setup.jit_step(cfg.loss).lower(
        setup.state, {"image": image, "target": target}, key).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def _flops_worker(rows) -> dict:
  return {"flops": [_program_flops(r["kind"], r["patch"], r["batch"], r["dtype"],
                                   r.get("model", "baseline"), r.get("overrides", ()))
                    for r in rows]}


def add_flops(result: dict) -> None:
  """Fills FLOPs per step and MFU into our rows that lack them (lowered on
  CPU in a subprocess: the program's FLOPs do not depend on the device)."""
  todo = [r for r in result["rows"] if r["framework"] == "jax" and "flops_per_step" not in r
          and "error" not in r]
  if not todo:
    return
  spec = json.dumps([{"overrides": r.get("overrides", []),
                      **{k: r.get(k, "baseline") for k in ("kind", "patch", "batch", "dtype",
                                                           "model")}} for r in todo])
  flops = _spawn(["--worker=flops", f"--spec={spec}"],
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))["flops"]
  spec_peak = _spec_peak(result["device"])
  for row, f in zip(todo, flops):
    voxels = row["batch"] * int(__import__("numpy").prod(row["patch"]))
    row["flops_per_step"] = f
    row["flops_per_voxel"] = f / voxels
    row["flops_source"] = "lowered HLO cost analysis on CPU"
    if spec_peak:
      row["mfu_spec"] = f / row["step_s"] / (spec_peak * result["devices"])
    if result.get("matmul_bf16_flops"):
      row["mfu_measured_matmul"] = f / row["step_s"] / (
          result["matmul_bf16_flops"] * result["devices"])


# ------------------------------------------------------------ the PyTorch peer

def _peer(model: str):
  """The PyTorch network of preset `model` at the benchmark's widths, with
  OVERRIDES: those that change the network (model.widths, model.norm, ...)
  change the peer's as they change ours; speed-only ones have no
  counterpart there and change nothing."""
  from bench.reference_torch import build  # pylint: disable=g-import-not-at-top
  cfg, _ = _bench_setup((16, 128, 128), 2, "float32", model=model, build=False,
                        overrides=OVERRIDES)
  return build.from_config(cfg.model)


def _torch_worker(kind: str, cases, dtypes, repeats: int, modes, model: str = "baseline") -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True
  rows = []
  for case in cases:
    patch, batch = CASES[kind][case]
    image, target = _inputs(patch, batch)
    x = torch.from_numpy(image).permute(0, 4, 1, 2, 3).contiguous().to(dev)
    y = torch.from_numpy(target).permute(0, 4, 1, 2, 3).contiguous().to(dev)
    x = x.to(memory_format=torch.channels_last_3d)
    y = y.to(memory_format=torch.channels_last_3d)
    for dtype in dtypes:
      for mode in modes:
        try:
          rows.append(_torch_row(kind, case, model, mode, dtype, x, y, repeats))
        except Exception as e:  # pylint: disable=broad-except
          if not _out_of_memory(e):
            raise
          rows.append(_oom_row("torch", mode, kind, case, patch, batch, dtype, model, e))
        rows[-1]["torch"] = torch.__version__
        if OVERRIDES:  # those that change the network changed the peer's too
          rows[-1]["overrides"] = list(OVERRIDES)
        print("ROW " + json.dumps(rows[-1]), flush=True)  # saved before the next mode runs
        if dev.type == "cuda":
          torch.cuda.empty_cache()
  return {"torch": torch.__version__, "device": str(dev), "rows": rows}


def _torch_row(kind: str, case: str, model_name: str, mode: str, dtype: str, x, y,
               repeats: int) -> dict:
  """One timed row of the peer: x [batch, 1, d, h, w], y [batch, 2, d, h, w]."""
  import torch  # pylint: disable=g-import-not-at-top
  from bench.reference_torch.res_unet import weighted_bce  # pylint: disable=g-import-not-at-top
  dev = x.device
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  torch.manual_seed(0)
  torch._dynamo.reset()  # pylint: disable=protected-access
  from bench.reference_torch import build  # pylint: disable=g-import-not-at-top
  model = build.channels_last(_peer(model_name).to(dev))
  net = torch.compile(model, dynamic=False) if mode == "compile" else model
  autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  if kind == "train":
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def one():
      with autocast:
        logits = net(x)
      loss = weighted_bce(logits, y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss
  else:
    model.eval()

    def one():
      with torch.inference_mode(), autocast:
        return torch.sigmoid(net(x))
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  one()
  sync()
  compile_s = time.perf_counter() - t0
  one()  # cudnn.benchmark picks algorithms on the first shapes it sees
  sync()
  step_s = _median_time(one, sync, repeats)
  batch, patch = x.shape[0], list(x.shape[2:])
  voxels = batch * int(__import__("numpy").prod(patch))
  print(f"  torch {mode} {model_name} {kind} {case} {dtype}: {step_s * 1e3:.1f} ms/step",
        flush=True)
  return {"framework": "torch", "mode": mode, "model": model_name, "kind": kind, "case": case,
          "patch": patch, "batch": batch, "dtype": dtype, "step_s": step_s,
          "voxels_per_s": voxels / step_s, "compile_s": compile_s,
          "peak_device_bytes": (torch.cuda.max_memory_allocated()
                                if dev.type == "cuda" else None)}


def _check_worker(models=MODELS) -> dict:
  """Our forward pass and the peer's on the same (converted) weights, and the
  gradients of the weighted-BCE loss both train on. For the
  STT-UNET the zero-initialised leaves (SST output projections, offset
  predictors, denoiser head) get random values first: at init they make the
  attention, the offsets and the denoiser no-ops, and the check must see them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bench.reference_torch import convert  # pylint: disable=g-import-not-at-top
  from bench.reference_torch.res_unet import weighted_bce  # pylint: disable=g-import-not-at-top
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  from stt_jax.train import losses, state as state_lib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_enable_x64", True)  # for the float64 gradient check
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  out = {}
  for name in models:
    cfg, _ = _bench_setup((8, 64, 64), 2, "float32", conv_impl="native", model=name,
                          build=False, overrides=OVERRIDES)
    model = unet.from_config(cfg.model)
    for patch in ((8, 64, 64), (16, 128, 96)):
      params = state_lib.init_params(model, patch, seed=3)
      rng = np.random.default_rng(4)
      params = jax.tree_util.tree_map(
          lambda p: p if np.any(p) else 0.2 * rng.standard_normal(p.shape).astype(np.float32),
          jax.device_get(params))
      image, target = _inputs(patch, 2, seed=1)
      ours = np.asarray(model.apply({"params": params}, image))
      peer = _peer(name).to(dev)
      convert.load_into(peer, params)
      with torch.no_grad():
        theirs = peer(torch.from_numpy(image).permute(0, 4, 1, 2, 3).to(dev))
        loss = weighted_bce(theirs, torch.from_numpy(target).permute(0, 4, 1, 2, 3).to(dev))
      theirs = theirs.permute(0, 2, 3, 4, 1).cpu().numpy()
      loss_o = losses.weighted_bce(ours, target)
      # the training signal too: every parameter's gradient, in float64 on both
      # sides (in float32 PyTorch's own STT-UNET gradient is 2.8e-4 of the
      # largest entry away from float64, ours 8e-6: rounding, not a difference)
      f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)
      model64 = model.clone(dtype=jnp.float64)
      grads = jax.grad(lambda p: losses.weighted_bce(
          model64.apply({"params": p}, image.astype(np.float64)), target.astype(np.float64)))(
              f64(params))
      ours_g = convert.flax_to_state_dict(jax.device_get(grads), np.float64)
      peer64 = peer.double()
      weighted_bce(peer64(torch.from_numpy(image).double().permute(0, 4, 1, 2, 3).to(dev)),
                   torch.from_numpy(target).double().permute(0, 4, 1, 2, 3).to(dev)).backward()
      peer_g = {k: v.grad.double().cpu() for k, v in peer64.named_parameters()}
      grad_scale = max(float(g.abs().max()) for g in peer_g.values())
      grad_diff = max(float((ours_g[k].double() - g).abs().max()) for k, g in peer_g.items())
      diff = float(np.abs(ours - theirs).max())
      scale = float(np.abs(theirs).max())
      out[f"{name} {'x'.join(map(str, patch))}"] = {
          "max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale,
          "loss_peer": float(loss), "loss_ours": float(loss_o),
          "gradient_relative": grad_diff / grad_scale}
  return out


# ----------------------------------------------------------------------- driver

# after its RESULT line a worker has nothing left to give: waiting longer for
# it (Inductor's compile-worker pool can take minutes to shut down, and its
# children may hold the pipe open) only spends a lease
EXIT_GRACE_S = 30


def _spawn(args: list[str], env=None, on_row=None) -> dict:
  """Runs this script as a worker; returns its RESULT. Each `ROW {json}` line
  it prints on the way goes to on_row at once, so a caller can save rows
  before a long worker ends (or is cut off by a time limit)."""
  return read_worker([sys.executable, os.path.abspath(__file__), *args], env, on_row)


def read_worker(command: list[str], env=None, on_row=None) -> dict:
  """_spawn's protocol for any command (tests give it a stand-in worker)."""
  with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env) as proc:
    result = None
    for line in proc.stdout:
      if line.startswith("RESULT "):
        result = json.loads(line[len("RESULT "):])
        break
      if line.startswith("ROW "):
        if on_row:
          on_row(json.loads(line[len("ROW "):]))
      else:
        print(line, end="", flush=True)
    try:
      proc.wait(timeout=EXIT_GRACE_S if result is not None else None)
    except subprocess.TimeoutExpired:
      print(f"  (worker still running {EXIT_GRACE_S} s after its result: stopped)", flush=True)
      proc.kill()
      proc.wait()
  if result is None or (proc.returncode and proc.returncode != -9):
    raise RuntimeError(f"worker {' '.join(command[1:])} failed (exit {proc.returncode})")
  return result


def _fmt_bytes(b) -> str:
  return f"{b / 2**30:.2f}" if b else "-"


def run(kinds, cases=None, dtypes=None, repeats=10,
        modes=("eager", "compile"), models=MODELS, chunks: int = 1,
        check: str = "first", flops: str = "after", attention_impl: str = "auto",
        overrides=()) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  modes = tuple(m for m in modes if m)
  # no modes: our rows alone (e.g. a second setting of ours beside a peer row
  # already measured in the same lease)
  have_torch = bool(modes) and importlib.util.find_spec("torch") is not None
  import jax  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == "cpu"
  cases = list(cases or (["tiny"] if on_cpu else ["paper", "small"]))
  dtypes = tuple(dtypes or (("float32",) if on_cpu else ("float32", "bfloat16")))
  result = {"kinds": list(kinds), "models": list(models), "cases": cases,
            "dtypes": list(dtypes), "torch": None,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  for model in models:  # a typo fails here, not in a worker after the peer's check
    cfg, _ = _bench_setup((8, 64, 64), 2, "float32", model=model, build=False,
                          overrides=overrides)
    if have_torch:
      from bench.reference_torch import build  # pylint: disable=g-import-not-at-top
      reason = build.unsupported(cfg.model)
      if reason:
        raise SystemExit(f"{model}: {reason}; or run ours alone with --modes=")
  if check == "only" and not have_torch:
    raise SystemExit("--check=only needs PyTorch (and torchvision) importable and a --modes")
  if have_torch and check != "skip":
    print("checking the peer against ours (float32, highest precision) ...", flush=True)
    result["equivalence"] = {}
    for model in models:  # one process each: the float64 STT gradient is large
      spec = json.dumps({"models": [model], "overrides": list(overrides)})
      result["equivalence"].update(_spawn(["--worker=check", f"--spec={spec}"]))
    for key, v in result["equivalence"].items():
      print(f"  {key}: max |ours - peer| / max |logit| = {v['relative']:.2e}; gradients "
            f"{v['gradient_relative']:.2e} of the largest")
    worst = max(max(v["relative"], v["gradient_relative"])
                for v in result["equivalence"].values())
    if check == "only":  # kept, passing or not: the record of what was checked
      path = result_files.results_path(
          f"vs_torch-check-{'_'.join(models)}{result_files.override_tag(overrides)}",
          jax.devices()[0].device_kind, os.path.join(ROOT, "bench", "results"))
      result_files.write_json(path, dict(result, overrides=list(overrides)))
    if worst > 1e-4:
      raise SystemExit(f"the PyTorch peer computes another function ({worst:.2e}); "
                       "fix bench/reference_torch before timing it")
    if check == "only":
      return result
  out_dir = os.path.join(ROOT, "bench", "results")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  result["rows"] = rows
  path = None

  def save():  # after every worker: a run cut short keeps what it measured
    nonlocal path
    tag = "" if tuple(models) == ("baseline",) else "-" + "_".join(models)
    # not to overwrite the default's rows (chunks: the baseline has no SST block to chunk)
    tag += result_files.settings_tag(attention_impl, chunks if "stt" in models else 1,
                                     overrides)
    path = result_files.results_path(f"vs_torch-{'_'.join(kinds)}{tag}",
                                     result.get("device", "unknown"), out_dir)
    result_files.write_json(path, result, quiet=True)
  for kind in kinds:
    for model in models:
      spec = json.dumps({"kind": kind, "cases": cases, "dtypes": list(dtypes),
                         "repeats": repeats, "modes": list(modes), "model": model,
                         "overrides": list(overrides)})
      for case in cases:  # one process per row: its peak-memory counter is its own
        for dtype in dtypes:
          one = json.dumps({"kind": kind, "cases": [case], "dtypes": [dtype],
                            "repeats": repeats, "model": model, "chunks": chunks,
                            "attention_impl": attention_impl, "overrides": list(overrides)})
          ours = _spawn(["--worker=jax", f"--spec={one}"])
          result.update({k: ours[k] for k in ("device", "platform", "devices", "jax",
                                              "matmul_bf16_flops")})
          rows += ours["rows"]
          save()
      if have_torch:
        def keep(row):
          result["torch"] = row["torch"]
          rows.append(row)
          save()
        _spawn(["--worker=torch", f"--spec={spec}"], on_row=keep)
  if flops == "after":
    add_flops(result)
  _print(result, have_torch)
  save()
  result_files.announce(path)
  return result


def _print(result: dict, have_torch: bool) -> None:
  print(f"\ndevice: {result['device']} x {result['devices']}, jax {result['jax']}, "
        f"torch {result['torch'] or 'not installed (pip install torch for the peer rows)'}")
  if result.get("glibc_tunables"):
    print(f"host heap: GLIBC_TUNABLES={result['glibc_tunables']}")
  if result.get("matmul_bf16_flops"):
    print(f"measured bf16 matmul 8192^3: {result['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s")
  print(f"{'model':<10}{'kind':<6}{'case':<7}{'patch x batch':<17}{'dtype':<9}{'framework':<15}"
        f"{'step ms':>9}{'voxels/s':>11}{'compile s':>10}{'peak GiB':>9}{'GFLOP/step':>11}"
        f"{'MFU':>7}")
  for r in result["rows"]:
    head = (f"{r.get('model', 'baseline'):<10}{r['kind']:<6}{r['case']:<7}"
            f"{'x'.join(map(str, r['patch'])) + ' x' + str(r['batch']):<17}"
            f"{r['dtype']:<9}{r['framework'] + ' ' + r['mode']:<15}")
    if "error" in r:
      print(f"{head}{r['error']:>9}")
      continue
    mfu = f"{100 * r['mfu_spec']:.1f}%" if "mfu_spec" in r else "-"
    gflop = f"{r['flops_per_step'] / 1e9:.0f}" if "flops_per_step" in r else "-"
    print(f"{head}{r['step_s'] * 1e3:>9.1f}"
          f"{r['voxels_per_s']:>11.3g}{r['compile_s']:>10.1f}"
          f"{_fmt_bytes(r['peak_device_bytes']):>9}{gflop:>11}{mfu:>7}")
  if not have_torch:
    return
  print("\nratios (ours / PyTorch peer, voxels/s; > 1: ours faster):")
  key = lambda r: (r.get("model", "baseline"), r["kind"], r["case"], r["dtype"])
  ours = {key(r): r for r in result["rows"] if r["framework"] == "jax"}
  for r in result["rows"]:
    if r["framework"] != "torch":
      continue
    o = ours.get(key(r))
    if not o:
      continue
    if "error" in o or "error" in r:
      ratio = "ours: " + o.get("error", "ok") + ", peer: " + r.get("error", "ok")
    else:
      r["ours_over_this"] = o["voxels_per_s"] / r["voxels_per_s"]
      ratio = f"{r['ours_over_this']:6.2f}x"
    print(f"  {key(r)[0]:<10}{r['kind']:<6}{r['case']:<7}{r['dtype']:<9} "
          f"vs torch {r['mode']:<8} {ratio}")


def main(kinds=("train", "infer")) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", choices=["jax", "torch", "check", "flops"])
  parser.add_argument("--spec", default="{}")
  parser.add_argument("--cases", default="", help="comma list of: paper, small, tiny")
  parser.add_argument("--dtypes", default="", help="float32,bfloat16 (default: both on a "
                      "GPU, float32 on a CPU)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--modes", default="eager,compile",
                      help="PyTorch modes; empty (--modes=): our rows only")
  parser.add_argument("--attention-chunks", type=int, default=1,
                      help="model.attention.chunks of our programs (less memory; the peer "
                           "is unchanged)")
  parser.add_argument("--check", default="first", choices=["first", "skip", "only"],
                      help="the peer-equivalence check (float32 outputs, float64 "
                      "gradients): before timing, not at all, or alone (it takes "
                      "~20 min on a 2-core CPU, for a GPU call split it off)")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma list of stt_jax presets, e.g. baseline,stt")
  parser.add_argument("--attention-impl", default="auto",
                      help="model.attention.implementation of our programs: auto, xla, "
                      "heads_major, cudnn or pallas (the fused spatial attention)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override (repeatable), e.g. "
                      "model.attention.deform_gradient=tap_major (ours only: the peer has "
                      "no such knob) or model.norm=group (both networks, and the check); "
                      "the JSON's name gains it")
  parser.add_argument("--flops", default="after", choices=["after", "skip"],
                      help="count our programs' FLOPs (XLA cost analysis, ~40 s on a CPU) "
                      "after timing, or skip it and fill them in later with --add-flops")
  parser.add_argument("--add-flops", metavar="JSON",
                      help="fill FLOPs/MFU into a results file measured elsewhere, reprint it")
  args = parser.parse_args()
  if not args.worker:  # as stt_jax.main does; the workers (both peers) inherit it
    from stt_jax import memory_use  # pylint: disable=g-import-not-at-top
    memory_use.restart_with_hugepages()
  if args.add_flops:
    with open(args.add_flops) as f:
      result = json.load(f)
    add_flops(result)
    _print(result, result.get("torch") is not None)
    result_files.write_json(args.add_flops, result)
    return
  if args.worker:
    spec = json.loads(args.spec)
    global ATTENTION_CHUNKS, ATTENTION_IMPL, OVERRIDES  # pylint: disable=global-statement
    OVERRIDES = tuple(spec.get("overrides", ())) if isinstance(spec, dict) else ()
    if args.worker == "check":
      out = _check_worker(spec.get("models", MODELS) if isinstance(spec, dict) else
                          spec or MODELS)
    elif args.worker == "flops":
      out = _flops_worker(spec)
    elif args.worker == "jax":
      ATTENTION_CHUNKS = int(spec.get("chunks", 1))
      ATTENTION_IMPL = spec.get("attention_impl", "auto")
      out = _jax_worker(spec["kind"], spec["cases"], spec["dtypes"], spec["repeats"],
                        spec.get("model", "baseline"))
    else:
      out = _torch_worker(spec["kind"], spec["cases"], spec["dtypes"], spec["repeats"],
                          spec["modes"], spec.get("model", "baseline"))
    print("RESULT " + json.dumps(out), flush=True)
    sys.stderr.flush()
    # skip interpreter teardown: Inductor's compile-worker pool can take
    # minutes to shut down, and nothing after RESULT is wanted
    os._exit(0)
  run(kinds, [c for c in args.cases.split(",") if c] or None,
      tuple(d for d in args.dtypes.split(",") if d) or None, args.repeats,
      tuple(args.modes.split(",")),
      tuple(m for m in args.models.split(",") if m), args.attention_chunks, args.check,
      args.flops, args.attention_impl, tuple(args.override))


if __name__ == "__main__":
  main()
