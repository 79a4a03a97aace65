"""Throughput of whole-volume segmentation: inference and decoding.

  .venv/bin/python bench/segment_throughput.py                 # CPU defaults
  python bench/segment_throughput.py --config=configs/mitoem_r.py \
      --shape=64,2048,2048 --block=64,2048,128                 # on a GPU

inference: the `segment` path's first stage, read -> model -> Gaussian blend
-> uint8 zarr write, block by block (untrained weights of --config's model:
the speed does not depend on them), timed after a warm-up on the volume's
first two blocks that compiles the programs the timed run uses (until session
11 the warm-up ran on a one-block copy whose programs the timed run compiled
again: figures measured before then include one compile). Also timed alone: the model on one batch of windows, so the table
shows how much of the path is the model. decoding: `blockwise.decode` of
probability maps made from synthetic labels plus noise. Peak host RSS and
(on GPU) peak device memory.

peer (when PyTorch is installed; --peer=off skips it): the PyTorch
sliding-window inference of bench/reference_torch/sliding_window.py, in its
own process, with the same network (bench/reference_torch, our initial weights
converted), volume, windows, overlap, batch and dtype: read the volume ->
windows -> model -> Gaussian blend -> uint8 zarr write, timed after a warm-up
on one block, for each PyTorch mode (eager, torch.compile). Its probabilities
are compared with ours (max |difference| in uint8 levels), and the ratio of
our voxels/s to its voxels/s is printed last.
Writes bench/results/segment_throughput-<platform>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import result_files  # noqa: E402  bench/, beside this file
from config_overrides import apply_overrides  # noqa: E402  bench/, beside this file

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from stt_jax import config as config_lib  # noqa: E402
from stt_jax import memory_use  # noqa: E402
from stt_jax.data import sources, synthetic  # noqa: E402
from stt_jax.data.targets import instance_contour  # noqa: E402
from stt_jax.infer import blocks, blockwise, pipeline, sliding_window  # noqa: E402
from stt_jax.models import unet  # noqa: E402
from stt_jax.train import state, step  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(","))


def _volume(directory: str, shape) -> tuple[str, np.ndarray]:
  spec = synthetic.SyntheticSpec(shape=tuple(shape),
                                 num_mitochondria=max(10, int(np.prod(shape) / 1.2e5)))
  image, labels = synthetic.generate(spec, 0)
  path = os.path.join(directory, "image.zarr")
  sources.write_array(path, image, voxel_size_nm=(30.0, 8.0, 8.0))
  return path, labels


def _device_peak_mb() -> float | None:
  peak = memory_use.device_peak_mb(jax.devices()[:1])
  return round(peak, 1) if peak else None


def _save_params(path: str, params) -> None:
  np.savez(path, **traverse_util.flatten_dict(jax.device_get(params), sep="/"))


def _load_params(path: str) -> dict:
  with np.load(path) as f:
    return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def _peer_worker(args, cfg) -> dict:
  """The PyTorch sliding-window peer on args.image (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  from bench.reference_torch import build, convert, sliding_window as peer_sw  # pylint: disable=g-import-not-at-top
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True
  model = build.from_config(cfg.model)
  convert.load_into(model, _load_params(args.params))
  model = build.channels_last(model.to(device).eval())
  net = torch.compile(model, dynamic=False) if args.peer_worker == "compile" else model
  window = tuple(cfg.infer.window)
  volume = sources.open_volume(args.image)
  shape = volume.shape
  # warm-up on one block, grown to a window where the block is thinner (the
  # default blocks are 128 wide along x): compilation, cuDNN's algorithm search
  warm = volume.read([0, 0, 0], [min(max(b, w), s) for b, w, s
                                 in zip(cfg.infer.block_shape, window, shape)])
  t0 = time.perf_counter()
  peer_sw.predict(net, np.asarray(warm), window, cfg.infer.overlap, args.batch, args.dtype,
                  device)
  warm_s = time.perf_counter() - t0
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  image = np.asarray(volume.read([0, 0, 0], list(shape)))
  read_s = time.perf_counter() - t0
  probs, times = peer_sw.predict(net, image, window, cfg.infer.overlap, args.batch,
                                 args.dtype, device)
  t1 = time.perf_counter()
  sources.write_array(args.out, probs)
  write_s = time.perf_counter() - t1
  total_s = time.perf_counter() - t0
  ours = np.asarray(sources.open_volume(args.ours).read([0, 0, 0, 0], list(probs.shape)))
  diff = np.abs(ours.astype(np.int16) - probs.astype(np.int16))
  return {"mode": args.peer_worker, "torch": torch.__version__, "warmup_s": round(warm_s, 2),
          "read_s": round(read_s, 2), "write_s": round(write_s, 2),
          **{f"{k}_s": round(v, 2) for k, v in times.items() if k != "windows"},
          "windows": times["windows"], "total_s": round(total_s, 2),
          "voxels_per_s": round(int(np.prod(shape)) / total_s),
          "max_abs_diff_uint8": int(diff.max()),
          "fraction_differing": float((diff > 0).mean()),
          "peak_device_mb": (round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
                             if device.type == "cuda" else None)}


def choose_peer_modes(requested: str, platform: str, has_torch: bool, model_cfg) -> list[str]:
  """--peer's modes. "auto": eager on a CPU, eager and compile elsewhere,
  none without PyTorch or for a network the peer cannot build (said in one
  line); asked for by name, such a network is a one-line SystemExit, before
  our run rather than after it."""
  from bench.reference_torch import build  # pylint: disable=g-import-not-at-top
  if requested == "off" or (requested == "auto" and not has_torch):
    return []
  if requested == "auto":
    modes = ["eager"] if platform == "cpu" else ["eager", "compile"]
  else:
    modes = [m for m in requested.split(",") if m]
    unknown = sorted(set(modes) - {"eager", "compile"})
    if unknown:
      raise SystemExit(f"--peer: unknown mode(s) {unknown}; eager, compile, off or auto")
  reason = build.unsupported(model_cfg)
  if reason and requested != "auto":
    raise SystemExit(f"--peer={requested}: {reason}")
  if reason:
    print(f"no PyTorch peer: {reason}", flush=True)
    return []
  return modes


def _run_peer(args, mode: str, image: str, params: str, ours: str, out: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--peer-worker={mode}", f"--image={image}",
         f"--params={params}", f"--ours={ours}", f"--out={out}",
         *(a for a in sys.argv[1:] if not a.startswith("--peer"))]
  proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"the PyTorch peer ({mode}) failed (exit {proc.returncode})")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  memory_use.restart_with_hugepages()  # as stt_jax.main does; the peer inherits it
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs/demo.py"))
  parser.add_argument("--shape", default="32,384,384", help="volume z,y,x")
  parser.add_argument("--window", default="16,128,128")
  parser.add_argument("--block", default="32,384,384", help="inference output block")
  parser.add_argument("--overlap", type=float, default=0.5)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--peer", default="auto",
                      help="PyTorch peer modes: eager,compile | off | auto (eager on CPU, "
                           "eager,compile on a GPU; off without PyTorch)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override (repeatable), e.g. model.conv_impl=im2col "
                           "(ours only) or model.widths=(16,24,32,48,64) (both networks); "
                           "the JSON's name gains it")
  for hidden in ("--peer-worker", "--image", "--params", "--ours", "--out"):
    parser.add_argument(hidden, help=argparse.SUPPRESS)
  args = parser.parse_args()
  cfg = config_lib.load_file(args.config)
  apply_overrides(cfg, args.override)
  shape, window, block = _ints(args.shape), _ints(args.window), _ints(args.block)
  with cfg.unlocked():
    cfg.infer.window, cfg.infer.block_shape = window, block
    cfg.infer.overlap, cfg.infer.batch_size = args.overlap, args.batch
    cfg.model.compute_dtype = args.dtype
  if args.peer_worker:
    print("RESULT " + json.dumps(_peer_worker(args, cfg)), flush=True)
    return
  platform = jax.devices()[0].platform
  peer_modes = choose_peer_modes(args.peer, platform,
                                 importlib.util.find_spec("torch") is not None, cfg.model)
  work = tempfile.mkdtemp(prefix="stt_seg_bench_")
  try:
    image_path, labels = _volume(work, shape)
    image = sources.open_volume(image_path)
    model = unet.from_config(cfg.model)
    params = state.init_params(model, window, seed=0)
    mesh = step.make_mesh()
    predict_fn = sliding_window.make_predict_fn(model, mesh, cfg.infer.tta)

    # compile: the first two blocks (the second carries the first's sums
    # along x when there is one) with the programs the timed run will use
    # (sliding_window caches them per model, mesh and shapes)
    t0 = time.perf_counter()
    warm = sliding_window.BlockPredictor(
        predict_fn, params, mesh, shape, window=window, overlap=args.overlap,
        batch_size=args.batch, block=block)
    for _ in warm.run(image, list(blocks.iterate(shape, block))[:2], as_uint8=True):
      pass
    compile_s = time.perf_counter() - t0

    out = os.path.join(work, "out")
    os.makedirs(out)
    t0 = time.perf_counter()
    probs, _ = pipeline.predict(cfg, predict_fn, params, image, mesh, out,
                                voxel_size_nm=(30.0, 8.0, 8.0))
    infer_s = time.perf_counter() - t0

    # the model alone on one batch of windows (the path's ceiling)
    n = mesh.shape["data"]
    batch = max(args.batch - args.batch % n, n)
    x = jax.device_put(np.random.default_rng(0).random((batch, *window, 1), np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    jax.block_until_ready(predict_fn(params, x))
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(predict_fn(params, x))
    model_window_s = (time.perf_counter() - t0) / (reps * batch)
    windows = int(np.prod([len(sliding_window.window_starts(s, w, args.overlap))
                           for s, w in zip(shape, window)]))
    redundancy = sliding_window.redundancy(shape, window, args.overlap, block)
    model_only_s = model_window_s * windows * redundancy

    # decoding: probabilities from the labels plus noise
    rng = np.random.default_rng(0)
    mask = (labels > 0).astype(np.float32)
    contour = instance_contour(labels, 1).astype(np.float32) * mask
    p = np.stack([mask, contour], -1) + rng.normal(0, 0.1, (*shape, 2)).astype(np.float32)
    gt_probs = sources.write_array(os.path.join(work, "gt_probs.zarr"),
                                   np.clip(np.round(p * 255), 0, 255).astype(np.uint8))
    settings = blockwise.DecodeSettings.from_config(cfg.decode)
    t0 = time.perf_counter()
    _, stats = blockwise.decode(gt_probs, os.path.join(work, "decoded"), settings)
    decode_s = time.perf_counter() - t0
    voxels = int(np.prod(shape))
    peers = []
    if peer_modes:
      params_path = os.path.join(work, "params.npz")
      _save_params(params_path, params)
      for mode in peer_modes:
        print(f"PyTorch peer ({mode}) ...", flush=True)
        try:
          peers.append(_run_peer(args, mode, image_path, params_path,
                                 os.path.join(out, "probabilities.zarr"),
                                 os.path.join(work, f"peer_{mode}.zarr")))
        except RuntimeError as e:  # our figures are kept; the row says what failed
          peers.append({"mode": mode, "error": str(e)})
    result = {
        "device": jax.devices()[0].device_kind, "platform": platform,
        "devices": jax.device_count(), "cpu_cores": os.cpu_count(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "config": os.path.relpath(args.config, ROOT), "widths": list(cfg.model.widths),
        "attention": cfg.model.attention.design, "dtype": args.dtype,
        "volume": list(shape), "window": list(window), "overlap": args.overlap,
        "infer_block": list(block), "decode_block": list(settings.block),
        "decode_halo": list(settings.halo), "batch": batch,
        "windows": windows, "block_redundancy": round(redundancy, 3),
        "compile_and_first_block_s": round(compile_s, 2),
        "infer_s": round(infer_s, 2), "infer_voxels_per_s": round(voxels / infer_s),
        "model_only_s": round(model_only_s, 2),
        "model_share_of_infer": round(model_only_s / infer_s, 3),
        "decode_s": round(decode_s, 2), "decode_voxels_per_s": round(voxels / decode_s),
        "decoded_instances": stats["instances"],
        "peak_host_rss_mb": round(memory_use.peak_resident_mb(), 1),
        "peak_device_mb": _device_peak_mb(),
        "probabilities_channels": probs.shape[-1],
        "overrides": list(args.override),
        "peers": peers,
    }
    for peer in (p for p in peers if "error" not in p):
      peer["ours_over_this"] = round(result["infer_voxels_per_s"] / peer["voxels_per_s"], 3)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  rows = [("device", f"{result['device']} x{result['devices']}"),
          ("volume / window / overlap", f"{shape} / {window} / {args.overlap}"),
          ("inference block (redundancy)", f"{block} ({result['block_redundancy']}x windows)"),
          ("compile + first two blocks", f"{result['compile_and_first_block_s']} s"),
          ("inference (read-model-blend-write)", f"{result['infer_voxels_per_s']:.3g} voxels/s"),
          ("model alone, same windows", f"{voxels / max(model_only_s, 1e-9):.3g} voxels/s"),
          ("model share of inference time", f"{result['model_share_of_infer']:.0%}"),
          ("decoding (blockwise watershed)", f"{result['decode_voxels_per_s']:.3g} voxels/s"),
          ("peak host RSS", f"{result['peak_host_rss_mb']:.0f} MiB"),
          ("peak device memory", f"{result['peak_device_mb']} MiB")]
  for peer in result["peers"]:
    if "error" in peer:
      rows.append((f"PyTorch peer {peer['mode']}", peer["error"]))
      continue
    rows.append((f"PyTorch peer {peer['mode']} (read-model-blend-write)",
                 f"{peer['voxels_per_s']:.3g} voxels/s (model {peer['model_s']} s, blend "
                 f"{peer['blend_s']} s, read {peer['read_s']} s, write {peer['write_s']} s)"))
    rows.append((f"  its output vs ours", f"max {peer['max_abs_diff_uint8']} uint8 levels, "
                 f"{peer['fraction_differing']:.4%} of values differ"))
  for peer in (p for p in result["peers"] if "error" not in p):
    rows.append((f"ours / PyTorch {peer['mode']}", f"{peer['ours_over_this']:.2f}x"))
  for name, value in rows:
    print(f"{name:<46}{value}")
  result_files.write_json(os.path.join(
      result_files.RESULTS_DIR,
      f"segment_throughput{result_files.override_tag(args.override)}-{platform}.json"), result)


if __name__ == "__main__":
  main()
