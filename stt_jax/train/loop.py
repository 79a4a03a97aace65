"""The training loop: sampler -> sharded step -> logs and checkpoints."""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from stt_jax.data import datasets
from stt_jax.data.sampler import PatchSampler
from stt_jax.errors import UserError
from stt_jax.models import unet
from stt_jax.train import checkpoint, state as state_lib, step as step_lib


def build(cfg):
  """Model, optimizer, fresh state and mesh for `cfg`."""
  model = unet.from_config(cfg.model)
  optimizer = state_lib.make_optimizer(cfg.train)
  state = state_lib.create(model, optimizer, tuple(cfg.data.patch_shape), cfg.seed)
  return model, optimizer, state, step_lib.make_mesh()


def train(cfg, workdir: str, *, resume: bool = False, overwrite: bool = False,
          quiet: bool = False):
  """Trains for cfg.train.steps; returns (model, final state, mesh)."""
  if not cfg.data.synthetic.enabled:  # check the data before touching workdir
    datasets.open_split(cfg, "train")
    datasets.open_split(cfg, "val")
  checkpoint.prepare_workdir(workdir, cfg.to_json_best_effort(indent=2),
                             resume=resume, overwrite=overwrite)
  if cfg.data.synthetic.enabled:
    datasets.ensure_synthetic(cfg, workdir)
  image, labels = datasets.open_split(cfg, "train")
  sampler = PatchSampler(image, labels, patch_shape=cfg.data.patch_shape,
                         batch_size=cfg.train.batch_size, seed=cfg.seed,
                         augment_config=cfg.data.augment,
                         contour_width=cfg.data.contour_width,
                         foreground_bias=cfg.data.foreground_bias)
  model, optimizer, state, mesh = build(cfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                 save_every=cfg.train.checkpoint_every,
                                 keep=cfg.train.keep_checkpoints)
  first = 0
  if resume and ckpts.latest_step() is not None:
    state = ckpts.restore(state)
    first = int(state.step)
  base_key = jax.random.wrap_key_data(jax.device_get(state.rng))
  step_fn = step_lib.jit_train_step(model, optimizer, cfg.loss, mesh, state)
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  voxels_per_step = cfg.train.batch_size * int(np.prod(cfg.data.patch_shape))
  total = int(cfg.train.steps)
  last_good = ckpts.latest_step()
  bar = tqdm.tqdm(total=total, initial=first, disable=quiet, unit="step",
                  dynamic_ncols=True)
  window_start, window_steps = time.perf_counter(), 0
  try:
    for step, batch in sampler.iterate(first, total, prefetch=cfg.data.prefetch):
      rng = jax.random.key_data(jax.random.fold_in(base_key, step))
      state, metrics = step_fn(state, step_lib.shard_batch(batch, mesh), rng)
      window_steps += 1
      done = step + 1
      is_log = done % cfg.train.log_every == 0 or done == total
      is_ckpt = done % cfg.train.checkpoint_every == 0 or done == total
      if is_log or is_ckpt:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
          where = (f"the last good checkpoint (step {last_good}) is kept in "
                   f"{ckpts.manager.directory}" if last_good is not None
                   else "no checkpoint was written")
          found = ", ".join(f"{k}={v}" for k, v in bad.items())
          raise UserError(f"training diverged at step {done} ({found}); {where}; "
                          "lower train.learning_rate or check the data")
        elapsed = time.perf_counter() - window_start
        values["voxels_per_s"] = voxels_per_step * window_steps / max(elapsed, 1e-9)
        window_start, window_steps = time.perf_counter(), 0
        for k, v in values.items():
          writer.add_scalar(f"train/{k}", v, done)
        bar.set_postfix(loss=f"{values['loss']:.4f}",
                        vox_s=f"{values['voxels_per_s']:.3g}")
        if is_ckpt:
          ckpts.save(done, state, force=done == total)
          last_good = done
      bar.update(1)
  finally:
    bar.close()
    writer.close()
    ckpts.close()
  return model, state, mesh
