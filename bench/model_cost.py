"""Cost of each ablation preset: parameters, FLOPs per voxel, activation
memory and compile time, from XLA's own analyses of the compiled programs.

  .venv/bin/python bench/model_cost.py                 # demo patch + paper patch
  .venv/bin/python bench/model_cost.py --skip-paper    # demo patch only (fast)
  .venv/bin/python bench/model_cost.py --chunks=1,4,16 # STT-UNET memory by model.attention.chunks

Two settings: the paper's (widths 28-80, SST at encoder stages 1-4 and
decoder stages 3-1, patch 32x320x320, batch 2 per device) and the CPU demo's
(configs/demo_stt.py, patch 8x64x64, batch 2). For each preset:
  * params: generator parameters (+ discriminator for stt_adv);
  * fwd / train GFLOP/voxel: `compiled.cost_analysis()["flops"]` of the forward
    pass and of loss+gradient, divided by the voxels in the batch;
  * fwd / train temp GiB: `compiled.memory_analysis().temp_size_in_bytes`,
    the scratch XLA plans beyond arguments and outputs: for the gradient this
    is mainly the activations kept for the backward pass;
  * compile s: wall time of lower + compile of the gradient program.
Then, at the paper setting, the same numbers for each SST block alone at the
shape its stage sees. Counts are the XLA program of *this* backend: on GPU a
cuDNN fused attention is a custom call whose FLOPs XLA does not count, so read
the CPU table for FLOPs and the GPU one for memory and compile time.
Writes bench/results/model_cost-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

from stt_jax import backend  # noqa: E402
backend.apply_default_xla_flags()  # the XLA flags a run gets (stt_jax/backend.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import demo_stt  # noqa: E402  pylint: disable=g-import-not-at-top
import mitoem_r  # noqa: E402  pylint: disable=g-import-not-at-top
import result_files  # noqa: E402  pylint: disable=g-import-not-at-top
from stt_jax import presets  # noqa: E402
from stt_jax.models import attention, unet  # noqa: E402
from stt_jax.models.discriminator import Discriminator  # noqa: E402

GIB = 2.0 ** 30


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  memory = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", float("nan"))),
          "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1))}


def _analyse(apply, params, x) -> dict:
  """Forward and gradient programs of apply(params, x) -> array."""
  forward = jax.jit(apply).lower(params, x).compile()
  loss = lambda p, v: jnp.mean(jnp.square(apply(p, v)))
  t0 = time.perf_counter()
  grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  f, g = _cost(forward), _cost(grad)
  voxels = int(np.prod(x.shape[:-1]))
  return {"fwd_flops_per_voxel": f["flops"] / voxels, "train_flops_per_voxel": g["flops"] / voxels,
          "fwd_temp_bytes": f["temp_bytes"], "train_temp_bytes": g["temp_bytes"],
          "compile_s": compile_s}


def _abstract_params(module, *inputs):
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *inputs)


def _count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def preset_rows(setting: str, get_config, batch: int) -> list[dict]:
  rows, cache = [], {}
  for name in presets.PRESETS:
    cfg = get_config(name)
    patch = tuple(cfg.data.patch_shape)
    x = jax.ShapeDtypeStruct((batch, *patch, 1), jnp.float32)
    model = unet.from_config(cfg.model)
    key = (model.attention_design, model.attention_fusion, model.denoise)
    if key not in cache:
      params = _abstract_params(model, x)
      row = _analyse(lambda p, v, m=model: m.apply(p, v), params, x)
      row["params"] = _count(params)
      cache[key] = row
    row = dict(cache[key], setting=setting, preset=name, patch=list(patch), batch=batch,
               paper_row=presets.PRESETS[name][4])
    if cfg.loss.adversarial_weight:
      disc = Discriminator()
      d_params = _abstract_params(disc, x, x)
      d = _analyse(lambda p, v, m=disc: m.apply(p, v, v), d_params, x)
      row["discriminator_params"] = _count(d_params)
      row["discriminator_train_flops_per_voxel"] = d["train_flops_per_voxel"]
      row["params"] += row["discriminator_params"]
      row["train_flops_per_voxel"] += d["train_flops_per_voxel"]
    rows.append(row)
  return rows


def stage_rows(batch: int) -> list[dict]:
  """Each SST block of the paper setting alone, at the shape its stage sees."""
  cfg = mitoem_r.get_config("stt")
  att, widths = cfg.model.attention, tuple(cfg.model.widths)
  t, h, w = cfg.data.patch_shape
  rows = []
  for where, levels in (("enc", att.encoder_levels), ("dec", att.decoder_levels)):
    for level in levels:
      shape = (batch, t, h // 2 ** level, w // 2 ** level, widths[level])
      x = jax.ShapeDtypeStruct(shape, jnp.float32)
      for fusion in attention.FUSIONS:
        block = attention.SSTBlock(design="split", fusion=fusion, num_heads=att.heads,
                                   kv_grid=att.kv_grid, deform_groups=att.deform_groups)
        params = _abstract_params(block, x)
        row = _analyse(lambda p, v, m=block: m.apply(p, v), params, x)
        tokens = shape[2] * shape[3]
        pooled = -(-max(shape[2], shape[3]) // attention.kv_pool_factor(
            shape[2], shape[3], att.kv_grid))
        rows.append(dict(row, stage=f"{where}{level}", fusion=fusion, shape=list(shape),
                         params=_count(params), block_fwd_gflop=row["fwd_flops_per_voxel"] *
                         np.prod(shape[:-1]) / 1e9,
                         spatial_tokens=tokens, kv_tokens=pooled ** 2,
                         full_attention_score_bytes=4 * shape[0] * shape[1] * att.heads *
                         tokens ** 2))
  return rows


def chunk_rows(batch: int, chunks: list[int]) -> list[dict]:
  """The paper-setting STT-UNET at each model.attention.chunks value."""
  rows = []
  for n in chunks:
    cfg = mitoem_r.get_config("stt")
    cfg.model.attention.chunks = n
    x = jax.ShapeDtypeStruct((batch, *cfg.data.patch_shape, 1), jnp.float32)
    model = unet.from_config(cfg.model)
    params = _abstract_params(model, x)
    row = _analyse(lambda p, v, m=model: m.apply(p, v), params, x)
    rows.append(dict(row, setting="paper", preset="stt", chunks=n, batch=batch,
                     patch=list(cfg.data.patch_shape), params=_count(params)))
    print(f"chunks {n:>4}: train temp {row['train_temp_bytes'] / GIB:8.2f} GiB, fwd temp "
          f"{row['fwd_temp_bytes'] / GIB:7.2f} GiB, train GFLOP/voxel "
          f"{row['train_flops_per_voxel'] / 1e9:.4f}, compile {row['compile_s']:.0f} s", flush=True)
  return rows


def _print_presets(rows):
  print(f"{'setting':<7}{'preset':<23}{'params':>10}{'fwd GF/vox':>11}{'train GF/vox':>13}"
        f"{'fwd tmp GiB':>12}{'train tmp GiB':>14}{'compile s':>10}")
  for r in rows:
    print(f"{r['setting']:<7}{r['preset']:<23}{r['params']:>10,}"
          f"{r['fwd_flops_per_voxel'] / 1e9:>11.4f}{r['train_flops_per_voxel'] / 1e9:>13.4f}"
          f"{r['fwd_temp_bytes'] / GIB:>12.3f}{r['train_temp_bytes'] / GIB:>14.3f}"
          f"{r['compile_s']:>10.1f}")


def _print_stages(rows):
  print(f"{'stage':<6}{'fusion':<8}{'shape':<22}{'KV':>5}{'fwd GFLOP':>10}{'fwd GF/vox':>11}"
        f"{'train tmp GiB':>14}{'full-attn scores GiB':>21}")
  for r in rows:
    print(f"{r['stage']:<6}{r['fusion']:<8}{'x'.join(map(str, r['shape'])):<22}"
          f"{r['kv_tokens']:>5}{r['block_fwd_gflop']:>10.1f}"
          f"{r['fwd_flops_per_voxel'] / 1e9:>11.5f}{r['train_temp_bytes'] / GIB:>14.3f}"
          f"{r['full_attention_score_bytes'] / GIB:>21.1f}")


def _write(name: str, payload: dict) -> None:
  """bench/results/<name>-<device>.json, with the device and jax version."""
  device = jax.devices()[0]
  path = result_files.results_path(name, device.device_kind)
  result_files.write_json(path, {"device": device.device_kind, "platform": device.platform,
                                 "jax": jax.__version__, **payload}, default=float)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--skip-paper", action="store_true",
                      help="only the demo setting (the 32x320x320 compiles take minutes on CPU)")
  parser.add_argument("--batch", type=int, default=2, help="batch per device")
  parser.add_argument("--chunks", default="",
                      help="only the paper STT-UNET at these model.attention.chunks values")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  if args.chunks:
    _write("model_cost_chunks",
           {"rows": chunk_rows(args.batch, [int(v) for v in args.chunks.split(",")])})
    return
  rows = preset_rows("demo", demo_stt.get_config, args.batch)
  stages = []
  if not args.skip_paper:
    rows += preset_rows("paper", mitoem_r.get_config, args.batch)
    stages = stage_rows(args.batch)
  _print_presets(rows)
  if stages:
    print()
    _print_stages(stages)
  _write("model_cost", {"presets": rows, "sst_stages": stages})


if __name__ == "__main__":
  main()
