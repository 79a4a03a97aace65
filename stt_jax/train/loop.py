"""The training loop: sampler -> sharded step -> logs, validation, checkpoints.

A run survives preemption: SIGTERM and SIGINT finish the current step, save a
checkpoint and stop; `--resume` continues exactly (the state holds the RNG and
the optimiser states, the sampler is a function of (seed, step)).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from stt_jax import errors, memory_use
from stt_jax.data import datasets, rescaled, sources
from stt_jax.data.sampler import PatchSampler
from stt_jax.errors import UserError
from stt_jax.models import unet
from stt_jax.train import checkpoint, history, state as state_lib, step as step_lib, warm_start


@dataclasses.dataclass
class Setup:
  """Everything a run is built from; `state` is fresh and placed on `mesh`."""
  model: object
  optimizer: object
  state: state_lib.TrainState
  mesh: jax.sharding.Mesh
  discriminator: object = None
  disc_optimizer: object = None
  ema_decay: float = 0.0

  def jit_step(self, loss_cfg):
    return step_lib.jit_train_step(
        self.model, self.optimizer, loss_cfg, self.mesh, self.state,
        discriminator=self.discriminator, disc_optimizer=self.disc_optimizer,
        ema_decay=self.ema_decay)


def components(cfg) -> tuple[Setup, object]:
  """(a Setup of `cfg` whose state and mesh are still None, the function that
  creates a fresh state): what `build` places on devices, and what
  bench/gpu_compile.py compiles for a GPU it does not have."""
  model = unet.from_config(cfg.model)
  optimizer = state_lib.make_optimizer(cfg.train)
  discriminator = disc_optimizer = None
  if cfg.loss.adversarial_weight > 0:
    discriminator = state_lib.make_discriminator(cfg.model)
    disc_optimizer = state_lib.make_disc_optimizer(cfg.train)
  ema_decay = float(cfg.train.ema_decay)
  create = functools.partial(
      state_lib.create, model, optimizer, tuple(cfg.data.patch_shape), cfg.seed,
      discriminator=discriminator, disc_optimizer=disc_optimizer, ema=ema_decay > 0)
  return Setup(model, optimizer, None, None, discriminator, disc_optimizer, ema_decay), create


def build(cfg, devices=None) -> Setup:
  """Models, optimisers, fresh state and mesh for `cfg`."""
  setup, create = components(cfg)
  mesh = step_lib.make_mesh(devices, model_parallel=int(cfg.train.model_parallel))
  # created in place with its shardings: nothing is copied between hosts
  shardings = step_lib.state_shardings(jax.eval_shape(create), mesh)
  state = jax.jit(create, out_shardings=shardings)()
  return dataclasses.replace(setup, state=state, mesh=mesh)


@dataclasses.dataclass
class Result:
  model: object
  state: state_lib.TrainState
  mesh: jax.sharding.Mesh
  # signal name when a signal ended the run early, "stop_at" when stop_at did
  stopped_by: str | None = None
  best: dict | None = None         # best validation scores seen
  final_validation: tuple | None = None  # validate()'s result at the last step


class _StopOnSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # a second signal: stop now, unsaved
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def feeder_workers(configured: int) -> int:
  """data.workers, 0 resolved to the cores this process may run on (>= 2)."""
  if configured:
    return int(configured)
  try:
    cores = len(os.sched_getaffinity(0))  # what SLURM / taskset grant, not the host's
  except AttributeError:
    cores = os.cpu_count() or 2
  return max(2, cores)


def prefetch_to_device(batches, mesh, depth: int = 2):
  """Yields (step, global batch on `mesh`) `depth` batches ahead: device_put
  is asynchronous, so the copies of the next batches overlap the current step."""
  queue = collections.deque()
  for step, batch in batches:
    queue.append((step, step_lib.shard_batch(batch, mesh)))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _is_main() -> bool:
  return jax.process_index() == 0


def validate(cfg, workdir: str, predict_fn, params, mesh) -> tuple[dict, str, str]:
  """Segments the held-out volume with `params` into <workdir>/val_segmentation
  (replaced each time: a derived output of the run) and scores it; each of
  data.val.more_volumes goes to val_segmentation_more<i> and all are scored
  as one set (`report.score_volume_set`).

  Returns (scores, the volume's path, the output folder); scores hold the
  metrics of `report.score` plus segment_seconds and volume_shape (of
  data.val), and with more volumes "per_volume": each one's own scores,
  path, volume_shape and output. With data.val.context a region is segmented
  with the image around it and only the region is scored (context_offset:
  where it lies in the output).
  """
  from stt_jax.infer import pipeline  # pylint: disable=g-import-not-at-top
  from stt_jax.metrics import report  # pylint: disable=g-import-not-at-top
  seconds, scored, described, max_probability, notes = 0.0, [], [], None, []
  for i, (image, labels, offset) in enumerate(datasets.open_validation_volumes(cfg)):
    out_dir = os.path.join(workdir, "val_segmentation" + (f"_more{i - 1}" if i else ""))
    t0 = time.perf_counter()
    summary = pipeline.segment(cfg, predict_fn, params, image, mesh, out_dir,
                               overwrite=True, with_report=False)
    seconds += time.perf_counter() - t0
    # with data.val.context the output also covers the context: score the region
    with_context = image.shape[:3] != labels.shape[:3]
    stop = [o + n for o, n in zip(offset, labels.shape[:3])]
    whole = (sources.open_volume(summary["instances_path"]),  # probabilities at its voxels
             rescaled.full_resolution(sources.open_volume(summary["probabilities_path"])))
    if with_context:  # objects' mean masks over the whole output, as decoded
      scored.append((labels, *(sources.RegionVolume(v, offset, stop) for v in whole), whole))
    else:
      scored.append((labels, *whole))
    path = image.path + (f", scored on [{list(offset)}:{stop}] of it (data.val.context)"
                         if with_context else "")
    described.append(dict(volume=path, volume_shape=list(labels.shape[:3]), output=out_dir,
                          **({"context_offset": list(offset)} if with_context else {})))
    # of the whole segmented volume
    if summary["max_mask_probability"] is not None:
      max_probability = max(max_probability or 0.0, summary["max_mask_probability"])
    if "decode_note" in summary:
      notes.append((f"volume {i}: " if cfg.data.val.more_volumes else "")
                   + summary["decode_note"])
  scores = report.score_volume_set(scored, min_gt_size=cfg.eval.min_gt_size,
                                   block=tuple(cfg.decode.block_shape),
                                   unlabelled_id=cfg.data.unlabelled_id)
  scores["segment_seconds"] = seconds
  scores["volume_shape"] = described[0]["volume_shape"]
  if "context_offset" in described[0]:
    scores["context_offset"] = described[0]["context_offset"]
  if "per_volume" in scores:
    scores["per_volume"] = [dict(d, **s) for d, s in zip(described, scores["per_volume"])]
  if max_probability is not None:
    scores["max_mask_probability"] = max_probability
  if notes:
    scores["decode_note"] = "\n".join(notes)
  return scores, described[0]["volume"], described[0]["output"]


def train(cfg, workdir: str, *, resume: bool = False, overwrite: bool = False,
          quiet: bool = False, stop_at: int | None = None, devices=None) -> Result:
  """Trains to cfg.train.steps (or `stop_at`, or a signal), checkpointing.

  SIGTERM/SIGINT are caught from the start (a signal while compiling stops
  after the first step, saved).
  """
  with _StopOnSignal() as stop:
    return _train(cfg, workdir, stop, resume=resume, overwrite=overwrite, quiet=quiet,
                  stop_at=stop_at, devices=devices)


def _sampler(cfg) -> PatchSampler:
  """The training split's patch sampler (checks the data as it opens it)."""
  factors = tuple(cfg.model.input_scale)
  pairs = [rescaled.binned_pair(image, labels, factors) for image, labels in
           [datasets.open_split(cfg, "train"), *datasets.open_more_volumes(cfg, "train")]]
  (image, labels), more = pairs[0], pairs[1:]
  return PatchSampler(image, labels, more_volumes=more,
                      patch_shape=cfg.data.patch_shape,
                      batch_size=cfg.train.batch_size, seed=cfg.seed,
                      augment_config=cfg.data.augment,
                      contour_width=cfg.data.contour_width,
                      distance_voxel_size=(
                          rescaled.binned_voxel_size(cfg.data.voxel_size_nm, factors)
                          if "distance" in cfg.model.outputs else None),
                      foreground_bias=cfg.data.foreground_bias,
                      unlabelled_id=cfg.data.unlabelled_id,
                      process_index=jax.process_index(),
                      process_count=jax.process_count())


def _stop_and_save_decision(stop: _StopOnSignal, done: int, log_every: int,
                            last_save_time: float, save_seconds: float
                            ) -> tuple[str | None, bool]:
  """(the signal that stops the run at this step or None, whether
  train.checkpoint_minutes have passed since the last save).

  One process decides alone, at every step. Several must stop and save at
  the same step (a save is collective: one process saving while another runs
  the next step waits forever, and the scheduler's SIGKILL then leaves no
  checkpoint), but signals reach them at different steps; so they agree at
  the multiples of train.log_every, which sync the host already: a signal
  any process received stops all of them there, and process 0's clock
  decides a timed save."""
  due = save_seconds > 0 and time.monotonic() - last_save_time >= save_seconds
  if jax.process_count() == 1:
    return stop.received, due
  if done % log_every:
    return None, False
  own = signal.Signals[stop.received].value if stop.received else 0
  views = np.asarray(multihost_utils.process_allgather(np.array([own, due], np.int32)))
  codes = [int(c) for c in views[:, 0] if c]
  return (signal.Signals(codes[0]).name if codes else None), bool(views[0, 1])


def _train(cfg, workdir: str, stop: _StopOnSignal, *, resume: bool, overwrite: bool,
           quiet: bool, stop_at: int | None, devices) -> Result:
  config_json = cfg.to_json_best_effort(indent=2)
  sampler = None
  if not cfg.data.synthetic.enabled:  # check the data before touching workdir
    sampler = _sampler(cfg)  # label dtype, foreground and patch size too
    datasets.open_validation_volumes(cfg)
  init_from = cfg.train.get("init_from", "")
  # read (and checked) before the workdir is touched too; a resumed run has
  # its own weights
  source = warm_start.read_source(init_from) if init_from and not resume else None
  state_lib.check_decay_exempt(unet.from_config(cfg.model), tuple(cfg.data.patch_shape),
                               cfg.train)
  resumed_from = checkpoint.newest_state(workdir) if resume else None
  if resumed_from and stop_at is not None and stop_at <= resumed_from[1]:
    raise UserError(f"--stop_at={stop_at}: the run in {workdir} is at step {resumed_from[1]} "
                    f"already; give a later step (train.steps is {cfg.train.steps})")
  if _is_main():
    checkpoint.prepare_workdir(workdir, config_json, resume=resume, overwrite=overwrite)
    if cfg.data.synthetic.enabled:
      datasets.ensure_synthetic(cfg, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("stt_jax workdir ready")
    if cfg.data.synthetic.enabled:  # written by process 0: only point at it
      datasets.ensure_synthetic(cfg, workdir)
  if sampler is None:
    sampler = _sampler(cfg)
  setup = build(cfg, devices)
  state, mesh = setup.state, setup.mesh
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                 save_every=cfg.train.checkpoint_every,
                                 keep=cfg.train.keep_checkpoints)
  validating = cfg.train.eval_every > 0 and jax.process_count() == 1
  best_ckpts = (checkpoint.Checkpoints(os.path.join(workdir, "best"), save_every=1,
                                       keep=1, best_metric=cfg.train.best_metric)
                if validating else None)
  first = 0
  best = final_validation = None
  if resumed_from is not None:
    directory, step = resumed_from
    if directory == str(ckpts.manager.directory):
      state = ckpts.restore(state, step)
    else:  # a kill after a validation, before the next periodic save
      state = checkpoint.restore_from(directory, state, step)
      if _is_main():
        print(f"resuming from {directory}/{step}: newer than any periodic "
              "checkpoint in checkpoints/", flush=True)
    first = int(step_lib.to_host(state.step))
  elif init_from:  # also a --resume that found no checkpoint yet
    source = source or warm_start.read_source(init_from)
    state, report = warm_start.apply(state, source)
    if _is_main():
      print(report.summary(source), flush=True)
  base_key = jax.random.wrap_key_data(step_lib.to_host(state.rng))
  step_fn = setup.jit_step(cfg.loss)
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if _is_main() else None
  metrics_history = (history.MetricsHistory(workdir, resumed_from=first if resume else None)
                     if _is_main() else None)
  voxels_per_step = cfg.train.batch_size * int(np.prod(cfg.data.patch_shape))
  total = int(cfg.train.steps)
  last = total if stop_at is None else min(total, int(stop_at))
  last_good, last_good_dir = (resumed_from[1], resumed_from[0]) if resumed_from else (
      None, ckpts.manager.directory)
  if resume and best_ckpts and best_ckpts.best_step() is not None:
    # the run's best so far, so that the best reported at the end is the
    # best of the whole run, not of this part of it
    best_step = best_ckpts.best_step()
    best = dict(best_ckpts.manager.metrics(best_step) or {}, step=best_step)
    if cfg.train.best_metric not in best:
      best = None
  predict_fn = None
  if validating:  # compiled once, reused by every validation
    from stt_jax.infer import sliding_window  # pylint: disable=g-import-not-at-top
    predict_fn = sliding_window.make_predict_fn(setup.model, mesh, cfg.infer.tta)
  postfix = {}
  bar = tqdm.tqdm(total=total, initial=first, disable=quiet or not _is_main(),
                  unit="step", dynamic_ncols=True)
  window_start, window_steps, window_sum = time.perf_counter(), 0, None
  add_metrics = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  done = first
  stopped_by = None
  save_seconds = 60.0 * float(cfg.train.checkpoint_minutes)
  last_save_time = time.monotonic()

  def kept() -> str:
    """Where the run can go on from, for the one-line errors below."""
    return (f"the last good checkpoint (step {last_good}) is kept in "
            f"{last_good_dir}" if last_good is not None
            else "no checkpoint was written")

  try:
    workers = feeder_workers(cfg.data.workers)
    batches = prefetch_to_device(
        sampler.iterate(first, last, prefetch=max(cfg.data.prefetch, workers),
                        workers=workers), mesh)
    for step, batch in batches:
      rng = jax.random.key_data(jax.random.fold_in(base_key, step))
      state, metrics = step_fn(state, batch, rng)
      # summed on the device (no host sync): the log shows the window's mean,
      # and a NaN at any step of it, not only the logged one's
      window_sum = metrics if window_sum is None else add_metrics(window_sum, metrics)
      window_steps += 1
      done = step + 1
      # read once: a signal landing later in this iteration (most land while
      # waiting for the step's metrics below) must not skip this step's save;
      # it stops the next step instead
      stopped_by, time_due = _stop_and_save_decision(
          stop, done, cfg.train.log_every, last_save_time, save_seconds)
      signalled = stopped_by is not None
      stopping = signalled or done == last
      is_log = done % cfg.train.log_every == 0 or stopping
      is_ckpt = done % cfg.train.checkpoint_every == 0 or stopping or time_due
      is_eval = validating and (done % cfg.train.eval_every == 0 or done == total)
      if is_log or is_ckpt or is_eval:
        values = {k: float(v) / window_steps
                  for k, v in step_lib.to_host(window_sum).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
          found = ", ".join(f"{k}={v}" for k, v in bad.items())
          steps = (f"at step {done}" if window_steps == 1
                   else f"in steps {done - window_steps + 1}-{done}")
          raise UserError(f"training diverged {steps} ({found}); {kept()}; "
                          "lower train.learning_rate or check the data")
        elapsed = time.perf_counter() - window_start
        values["voxels_per_s"] = voxels_per_step * window_steps / max(elapsed, 1e-9)
        window_start, window_steps, window_sum = time.perf_counter(), 0, None
        if writer:
          for k, v in values.items():
            writer.add_scalar(f"train/{k}", v, done)
          # a long run's host memory should be flat: a leak shows here first
          memory = {k: v for k, v in (
              ("host_rss_mb", memory_use.resident_mb()),
              ("device_peak_mb", memory_use.device_peak_mb(
                  d for d in mesh.devices.flat
                  if d.process_index == jax.process_index()))) if v is not None}
          for k, v in memory.items():
            writer.add_scalar(f"memory/{k}", v, done)
          metrics_history.write("train", done, {**values, **memory})
        postfix.update(loss=f"{values['loss']:.4f}",
                       vox_s=f"{values['voxels_per_s']:.3g}")
        if "d_loss" in values:
          postfix["d"] = f"{values['d_loss']:.3f}"
        if is_ckpt:
          ckpts.save(done, state, force=True)
          last_good, last_good_dir = done, ckpts.manager.directory
          last_save_time = time.monotonic()
        if is_eval:
          try:
            validation = validate(cfg, workdir, predict_fn, state.inference_params(), mesh)
          except Exception as e:  # pylint: disable=broad-except
            oom = errors.is_out_of_memory(e)
            # the state is intact: keep the steps run so far. A failure other
            # than memory may hit one process only, and a save is collective,
            # so that case saves in single-process runs only
            if last_good != done and (oom or jax.process_count() == 1):
              ckpts.save(done, state, force=True)
              last_good, last_good_dir = done, ckpts.manager.directory
            if not oom:
              if last_good == done:
                print(f"validation failed at step {done}; the step is saved in "
                      f"{ckpts.manager.directory}: fix the cause below, then continue "
                      "with --resume", file=sys.stderr, flush=True)
              raise
            raise UserError(
                f"out of device memory validating at step {done}: "
                f"{errors.LOWER_INFERENCE_MEMORY}; step {done} is saved in "
                f"{ckpts.manager.directory}, continue with --resume "
                f"({errors.first_line(e)})") from e
          scores = validation[0]
          if done == total:
            final_validation = validation
          if writer:
            logged = history.with_volume_scalars(scores)
            for k, v in logged.items():
              if isinstance(v, (int, float)):
                writer.add_scalar(f"val/{k}", v, done)
            metrics_history.write("val", done, logged)
          best_ckpts.save(done, state, force=True, metrics=scores)
          if best is None or scores[cfg.train.best_metric] > best[cfg.train.best_metric]:
            best = dict(scores, step=done)
          postfix.update(ap75=f"{scores['ap_75']:.3f}", jac=f"{scores['jaccard']:.3f}")
        bar.set_postfix(postfix)
      bar.update(1)
      if signalled:
        break
  except Exception as e:  # pylint: disable=broad-except
    if not errors.is_out_of_memory(e):
      raise
    raise UserError(
        f"out of device memory training, {done} steps done: "
        f"{errors.LOWER_TRAINING_MEMORY}; {kept()} "
        f"({errors.first_line(e)})") from e
  finally:
    bar.close()
    if writer:
      writer.close()
      metrics_history.close()
    ckpts.close()
    if best_ckpts:
      best_ckpts.close()
  return Result(setup.model, state, mesh,  # short of total unsignalled: stop_at's stop
                stopped_by=(stopped_by or "stop_at") if done < total else None, best=best,
                final_validation=final_validation)
