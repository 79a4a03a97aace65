"""The training loop: exact resume, preemption by SIGTERM, and two processes
joined by jax.distributed matching one process."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from stt_jax import config as config_lib
from stt_jax.train import checkpoint, loop
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import demo  # noqa: E402  pylint: disable=g-import-not-at-top

# tiny model and volumes; the adversarial loss and the EMA on, so that every
# part of the state is exercised
OVERRIDES = {
    # three levels: the loop's behaviour does not depend on depth, and
    # compiling (once per process) is most of these tests' time
    "model.widths": (4, 6, 8), "model.downsample_z": (False, False),
    "model.norm_groups": 2,  # the demo's GroupNorm
    "model.discriminator.features": (4, 8),
    "data.synthetic.train_shape": (8, 64, 64), "data.synthetic.val_shape": (8, 64, 64),
    "data.patch_shape": (4, 32, 32), "infer.window": (4, 32, 32),
    "train.steps": 6, "train.log_every": 3, "train.checkpoint_every": 3,
    "train.warmup_steps": 2, "train.schedule": "cosine", "train.ema_decay": 0.9,
    "loss.adversarial_weight": 0.5, "decode.min_size": 8, "eval.min_gt_size": 10,
}


def _cfg(**extra):
  cfg = demo.get_config()
  for key, value in {**OVERRIDES, **extra}.items():
    section, name = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
      node = node[part]
    node[name] = value
  config_lib.validate(cfg)
  return cfg


def _flags(**extra):
  out = []
  for key, value in {**OVERRIDES, **extra}.items():
    text = "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else value
    out.append(f"--config.{key}={text}")
  return out


def _assert_same_state(a, b, exact=True):
  for part in ("step", "params", "opt_state", "disc_params", "disc_opt_state",
               "ema_params", "rng"):
    la, lb = jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))
    assert len(la) == len(lb), part
    for x, y in zip(la, lb):
      if exact:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=part)
      else:
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=part)


def _restore(cfg, workdir, step=None):
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), save_every=1,
                                 keep=100)
  state = ckpts.restore(loop.build(cfg).state, step)
  ckpts.close()
  return state


def test_stop_resume_equals_uninterrupted_also_across_2_1_2_devices(tmp_path):
  cfg = _cfg()
  full = loop.train(cfg, str(tmp_path / "full"), quiet=True)
  part = loop.train(cfg, str(tmp_path / "split"), quiet=True, stop_at=3)
  assert int(part.state.step) == 3
  shutil.copytree(tmp_path / "split", tmp_path / "split_one_device")
  resumed = loop.train(cfg, str(tmp_path / "split"), quiet=True, resume=True)
  assert int(full.state.step) == int(resumed.state.step) == 6
  _assert_same_state(full.state, resumed.state)
  _assert_same_state(full.state, _restore(cfg, str(tmp_path / "split")))
  assert jax.device_count() >= 2, "run with --xla_force_host_platform_device_count=2"
  # saved on 2 devices, resumed on 1 to step 5, then on 2 again to the end
  one = loop.train(cfg, str(tmp_path / "split_one_device"), quiet=True, resume=True,
                   stop_at=5, devices=jax.devices()[:1])
  assert one.mesh.devices.size == 1 and int(one.state.step) == 5
  two = loop.train(cfg, str(tmp_path / "split_one_device"), quiet=True, resume=True)
  assert two.mesh.devices.size == 2 and int(two.state.step) == 6
  _assert_same_state(full.state, two.state, exact=False)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(devices))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  work = str(tmp_path / "run")
  proc = subprocess.Popen(
      [sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py", f"--workdir={work}",
       "--quiet", *_flags(**{"train.steps": 100000, "train.checkpoint_every": 100000,
                             "train.log_every": 100000})],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()  # printed just before training starts
    assert line.startswith("backend"), line + proc.stderr.read()
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 143, err
  assert "stopped by SIGTERM" in err and "--resume" in err
  steps = [int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 1
  cfg = _cfg(**{"train.steps": 100000, "train.checkpoint_every": 100000,
                "train.log_every": 100000})
  state = _restore(cfg, work)
  assert int(state.step) == steps[0]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_signal_during_the_metrics_wait_still_saves(tmp_path, monkeypatch):
  """Most of a step's wall time is spent waiting for its metrics (to_host):
  a SIGTERM landing there must still end with a checkpoint of the step the
  run stopped at (it used to break out unsaved, and --resume went back to
  the last periodic checkpoint)."""
  # the same program as the resume test's (compilation cache)
  cfg = _cfg(**{"train.log_every": 2, "train.checkpoint_every": 100})
  real_to_host = loop.step_lib.to_host
  calls = []

  def to_host_then_signal(tree):
    out = real_to_host(tree)
    if isinstance(tree, dict) and "loss" in tree and not calls:  # the first metrics wait
      calls.append(1)
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(loop.step_lib, "to_host", to_host_then_signal)
  work = str(tmp_path / "run")
  result = loop.train(cfg, work, quiet=True)
  assert result.stopped_by == "SIGTERM"
  stopped = int(result.state.step)
  assert stopped == 3  # the signal arrived while step 2's metrics were read
  steps = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
  assert steps == [stopped]


class _RecordingWriter:
  """Stands in for tensorboardX's SummaryWriter: keeps (tag, step) -> value."""

  def __init__(self, logdir):
    del logdir
    self.values = {}
    _RecordingWriter.last = self

  def add_scalar(self, tag, value, step):
    self.values[(tag, step)] = float(value)

  def close(self):
    pass


def test_logged_training_metrics_are_the_window_mean(tmp_path, monkeypatch):
  """train/* at step s is the mean over the steps since the previous log, not
  step s's value alone (one batch of a few patches is too noisy to read a
  learning curve from): logging every 3 steps gives the mean of the values a
  run logging every step records (same seed, same batches, same arithmetic)."""
  monkeypatch.setattr(loop, "SummaryWriter", _RecordingWriter)
  extra = {"loss.adversarial_weight": 0.0, "train.ema_decay": 0.0,
           "train.checkpoint_every": 100}
  loop.train(_cfg(**extra, **{"train.log_every": 1}), str(tmp_path / "every"), quiet=True)
  every = _RecordingWriter.last.values
  loop.train(_cfg(**extra, **{"train.log_every": 3}), str(tmp_path / "third"), quiet=True)
  third = _RecordingWriter.last.values
  for tag in ("train/loss", "train/bce", "train/dice"):
    per_step = [every[(tag, s)] for s in range(1, 7)]
    assert len(set(per_step)) > 1, tag   # distinct values, or the check is empty
    for end in (3, 6):
      np.testing.assert_allclose(third[(tag, end)], np.mean(per_step[end - 3:end]),
                                 rtol=1e-5, err_msg=f"{tag} at {end}")
    assert (tag, 2) not in third


def test_memory_in_use_is_logged_in_mib(tmp_path, monkeypatch):
  """memory/host_rss_mb at each logged step lies between a floor no process
  with jax and a model loaded is under (50 MiB) and this process's peak
  resident set read independently (getrusage, KiB on Linux): pages, KiB or
  bytes land outside. The kernel's resident counters are per-CPU
  approximations (statm and the high-water mark can disagree by a few
  hundred KiB: CI saw 2127.80 against a peak of 2127.73), so the ceiling has
  a slack far below the 256x-1024x a wrong unit gives. A device peak, where
  the backend keeps one, is positive (the CPU keeps none: the tag is then
  absent)."""
  monkeypatch.setattr(loop, "SummaryWriter", _RecordingWriter)
  loop.train(_cfg(**{"train.log_every": 2, "train.checkpoint_every": 100}),
             str(tmp_path / "run"), quiet=True)
  values = _RecordingWriter.last.values
  host = {step: v for (tag, step), v in values.items() if tag == "memory/host_rss_mb"}
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  assert sorted(host) == [2, 4, 6]
  for step, mib in host.items():
    assert 50.0 < mib <= 1.02 * peak_mib + 8.0, (step, mib, peak_mib)
  assert all(v > 0 for (tag, _), v in values.items() if tag == "memory/device_peak_mb")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  """launch/processes.sh starts the two processes (the README's command)."""
  extra = {"train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 1}
  multi = str(tmp_path / "multi")
  env = dict(_env(1), PYTHON=sys.executable, PORT=str(_free_port()), DEVICES_PER_PROCESS="1")
  out = subprocess.run(["bash", "launch/processes.sh", "2", "configs/demo.py", multi,
                        "--quiet", *_flags(**extra)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  # process 0 prints straight to the terminal, the others with a prefix
  assert "\nbackend cpu: 2 device(s) (cpu) in 2 process(es), 1 local" in "\n" + out.stdout
  # the same run in this process, on its 2 devices
  cfg = _cfg(**extra)
  single = loop.train(cfg, str(tmp_path / "single"), quiet=True)
  _assert_same_state(single.state, _restore(cfg, multi), exact=False)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path):
  """Signals reach the processes of a job at different steps; a save is
  collective, so one process saving while the other ran on used to hang
  until the scheduler's SIGKILL, with nothing saved. Both stop at the next
  multiple of train.log_every, save that step together and exit 143."""
  extra = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.log_every": 3}
  work, port = str(tmp_path / "run"), _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-u", "-m", "stt_jax.main", "--config=configs/demo.py",
       f"--workdir={work}", "--quiet", *_flags(**extra),
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    line = procs[0].stdout.readline()  # printed just before training starts
    assert line.startswith("backend"), line + procs[0].stderr.read()
    time.sleep(5.0)
    procs[1].send_signal(signal.SIGTERM)  # the other process gets none
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [143, 143], outputs
  assert "stopped by SIGTERM at step" in outputs[0][1]
  steps = checkpoint.saved_steps(os.path.join(work, "checkpoints"))
  assert len(steps) == 1 and steps[0] % 3 == 0, steps
  assert f"stopped by SIGTERM at step {steps[0]};" in outputs[0][1]


def test_out_of_memory_while_validating_saves_the_step_and_says_so(tmp_path, monkeypatch):
  """A validation that runs out of device memory between checkpoints: the
  trained steps are saved (the state is intact), one line says what to
  lower and how to continue, and the run continues from there."""
  from stt_jax.errors import UserError

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying "
                                     "to allocate 123 bytes.\nmore detail")

  monkeypatch.setattr(loop, "validate", out_of_memory)
  cfg = _cfg(**{"train.eval_every": 2, "train.checkpoint_every": 100, "train.log_every": 2})
  work = str(tmp_path / "run")
  with pytest.raises(UserError) as info:
    loop.train(cfg, work, quiet=True)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("out of device memory validating at step 2: lower "
                            "infer.batch_size or infer.block_shape; step 2 is saved")
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
  assert int(_restore(cfg, work).step) == 2


def test_any_validation_failure_keeps_the_trained_steps(tmp_path, monkeypatch, capsys):
  """A bug in validation (here: code changed under a running process) loses
  no training: the step is saved, the error keeps its traceback, one line
  says where the step is and how to continue."""

  def broken(*args, **kwargs):
    raise TypeError("BlockPredictor.__init__() got an unexpected keyword argument 'box'")

  monkeypatch.setattr(loop, "validate", broken)
  cfg = _cfg(**{"train.eval_every": 2, "train.checkpoint_every": 100, "train.log_every": 2})
  work = str(tmp_path / "run")
  with pytest.raises(TypeError, match="unexpected keyword argument 'box'"):
    loop.train(cfg, work, quiet=True)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
  assert int(_restore(cfg, work).step) == 2
  assert ("validation failed at step 2; the step is saved in "
          f"{os.path.join(work, 'checkpoints')}") in capsys.readouterr().err


def test_resume_after_a_kill_goes_on_from_the_newer_best_state(tmp_path, monkeypatch,
                                                                capsys):
  """Killed (no SIGTERM, nothing saved on the way out) after a validation and
  before the next periodic checkpoint: best/ holds the newest state, and
  --resume goes on from it instead of from the start; the best reported at
  the end is the whole run's, not the resumed part's."""
  scores = []

  def fake_validate(*args, **kwargs):  # the metric each validation reports
    return {"ap_75": scores.pop(0), "jaccard": 0.5}, "", ""

  monkeypatch.setattr(loop, "validate", fake_validate)
  cfg = _cfg(**{"train.eval_every": 2, "train.checkpoint_every": 100,
                "train.best_metric": "ap_75"})
  scores[:] = [0.5, 0.7, 0.6]
  full = loop.train(cfg, str(tmp_path / "full"), quiet=True)
  assert full.best["step"] == 4 and not scores
  work = tmp_path / "killed"
  scores[:] = [0.5, 0.7]
  loop.train(cfg, str(work), quiet=True, stop_at=4)
  # what a SIGKILL after step 4's validation leaves: best/4 and no checkpoint
  shutil.rmtree(work / "checkpoints")
  assert checkpoint.saved_steps(str(work / "best")) == [4]
  capsys.readouterr()
  scores[:] = [0.6]
  resumed = loop.train(cfg, str(work), quiet=True, resume=True)
  assert f"resuming from {work / 'best'}/4" in capsys.readouterr().out
  assert not scores  # one validation (step 6): it did not start over
  assert int(resumed.state.step) == 6
  _assert_same_state(full.state, resumed.state)
  assert (resumed.best["step"], resumed.best["ap_75"]) == (4, 0.7)
  assert checkpoint.saved_steps(str(work / "best")) == [4]
  # metrics.jsonl tells the same history as the uninterrupted run's
  def history(run):
    with open(run / "metrics.jsonl") as f:
      return [(r["kind"], r["step"], r.get("loss"), r.get("ap_75"))
              for r in map(json.loads, f)]
  assert history(work) == history(tmp_path / "full")
  assert [h[:2] for h in history(work) if h[0] == "val"] == [("val", 2), ("val", 4),
                                                            ("val", 6)]


def test_checkpoints_are_also_saved_by_time(tmp_path):
  """train.checkpoint_minutes saves between the step-based saves: here 60 us,
  shorter than any step, so every step is saved; 0 saves by steps only."""
  by_steps = _cfg(**{"train.checkpoint_every": 100, "train.keep_checkpoints": 10,
                     "train.checkpoint_minutes": 0.0})
  loop.train(by_steps, str(tmp_path / "steps"), quiet=True)
  assert checkpoint.saved_steps(str(tmp_path / "steps" / "checkpoints")) == [6]
  by_time = _cfg(**{"train.checkpoint_every": 100, "train.keep_checkpoints": 10,
                    "train.checkpoint_minutes": 1e-6})
  loop.train(by_time, str(tmp_path / "time"), quiet=True)
  assert checkpoint.saved_steps(str(tmp_path / "time" / "checkpoints")) == [1, 2, 3, 4, 5, 6]


def test_out_of_memory_in_a_training_step_is_one_line(tmp_path, monkeypatch):
  from stt_jax.errors import UserError

  real_to_host = loop.step_lib.to_host

  def out_of_memory(tree):
    if isinstance(tree, dict) and "loss" in tree:  # surfaces at the metrics
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying "
                                       "to allocate 456 bytes.\nmore detail")
    return real_to_host(tree)

  monkeypatch.setattr(loop.step_lib, "to_host", out_of_memory)
  with pytest.raises(UserError) as info:
    loop.train(_cfg(), str(tmp_path / "run"), quiet=True)
  message = str(info.value)
  assert "\n" not in message and "allocate 456 bytes" in message
  assert message.startswith("out of device memory training, 3 steps done: lower "
                            "train.batch_size or data.patch_shape")
  assert "no checkpoint was written" in message
