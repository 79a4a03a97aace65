"""train.init_from: which tensors are copied from where, read from exports
and run folders whatever devices saved them."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.config import default_config
from stt_jax.errors import UserError
from stt_jax.models import unet
from stt_jax.train import checkpoint, state as state_lib, warm_start
from tests.conftest import xla_flags


def _source(**params):
  return warm_start.Source("/src", "test", {k: np.asarray(v) for k, v in params.items()})


def test_merge_copies_same_path_and_shape_only():
  fresh = {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"kernel": jnp.zeros(4)},
           "c": {"bias": jnp.full(5, 7.0)}}
  source = _source(**{"a/kernel": np.arange(6.0).reshape(2, 3), "b/kernel": np.ones(3),
                      "z/kernel": np.ones(1)})
  merged, report = warm_start.merge(fresh, source)
  np.testing.assert_array_equal(merged["a"]["kernel"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(merged["b"]["kernel"], np.zeros(4))   # other shape
  np.testing.assert_array_equal(merged["c"]["bias"], np.full(5, 7.0))  # not in source
  assert merged["a"]["kernel"].dtype == jnp.float32
  assert (report.copied, report.fresh, report.unused, report.values) == (
      ["a/kernel"], ["c/bias"], ["z/kernel"], 6)
  assert report.reshaped == ["b/kernel (3,) vs (4,)"]
  line = report.summary(source)
  assert "copied 1 of 3" in line and "1 new kept fresh (c)" in line
  assert "b/kernel (3,) vs (4,)" in line and "1 of the source unused (z)" in line

  with pytest.raises(UserError, match="shares no parameter"):
    warm_start.merge(fresh, _source(**{"b/kernel": np.ones(3)}))


def _cfg(design="none"):
  cfg = default_config()
  cfg.model.widths = (4, 4, 6, 6, 8)
  cfg.data.patch_shape = (4, 32, 32)
  cfg.model.attention.design = design
  return cfg


def _random_params(cfg, seed=1):
  """Random weights of the model's shapes (no initialiser compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(unet.from_config(cfg.model).init, jax.random.key(0),
                          jnp.zeros((1, *cfg.data.patch_shape, 1)))["params"]
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                      shapes)


def _fresh_state(params):
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                              disc_params={}, disc_opt_state={}, ema_params={},
                              rng=jax.random.key_data(jax.random.key(0)))


def test_stt_from_a_baseline_export_takes_every_baseline_tensor(tmp_path):
  """Every baseline tensor lands at its place in the STT-UNET; only the SST
  blocks stay fresh. With tests/models/test_unet.py (an STT-UNET with fresh
  SST blocks computes the baseline on its non-SST weights) this makes the
  seeded STT-UNET compute the baseline's function; no model is compiled here."""
  params = _random_params(_cfg())   # a "trained" baseline
  export = str(tmp_path / "export")
  checkpoint.export_weights(export, params, _cfg().model.to_dict())
  fresh = _fresh_state(_random_params(_cfg("split"), seed=2))
  state, report = warm_start.apply(fresh, warm_start.read_source(export))
  assert report.fresh and all(p.startswith("sst_") for p in report.fresh)
  assert not report.reshaped and not report.unused
  assert len(report.copied) == len(jax.tree.leaves(params))
  for name in fresh.params:
    want = fresh.params[name] if name.startswith("sst_") else params[name]
    jax.tree.map(np.testing.assert_array_equal, state.params[name], want)
  assert any(not np.array_equal(state.params[n]["kernel"], fresh.params[n]["kernel"])
             for n in params if "kernel" in params[n])


def test_run_folder_source_takes_its_ema_weights(tmp_path):
  cfg = _cfg()
  cfg.train.ema_decay = 0.9
  fresh = _fresh_state(_random_params(cfg))
  ema = jax.tree.map(lambda p: p + 1.0, fresh.params)
  state = fresh.replace(ema_params=ema, step=jnp.asarray(7, jnp.int32))
  run = tmp_path / "run"
  checkpoint.prepare_workdir(str(run), cfg.to_json_best_effort(), resume=False,
                             overwrite=False)
  ckpts = checkpoint.Checkpoints(str(run / "checkpoints"), save_every=1, keep=1)
  ckpts.save(7, state, force=True)
  ckpts.close()
  source = warm_start.read_source(str(run))
  assert source.what == "latest state, step 7, EMA weights"
  flat_ema = warm_start._flat(jax.device_get(ema))  # pylint: disable=protected-access
  assert source.params.keys() == flat_ema.keys()
  for k, v in flat_ema.items():
    np.testing.assert_array_equal(source.params[k], v)
  # the fresh state's EMA follows the copied weights
  with_ema = fresh.replace(ema_params=jax.tree.map(jnp.zeros_like, fresh.params))
  started, _ = warm_start.apply(with_ema, source)
  jax.tree.map(np.testing.assert_array_equal, started.ema_params, ema)
  jax.tree.map(np.testing.assert_array_equal, started.params, ema)


def test_sources_that_cannot_be_used(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    warm_start.read_source(str(tmp_path / "nope"))
  (tmp_path / "plain").mkdir()
  with pytest.raises(UserError, match="neither an stt_jax export"):
    warm_start.read_source(str(tmp_path / "plain"))
  run = tmp_path / "empty_run"
  run.mkdir()
  (run / checkpoint.RUN_MARKER).write_text(json.dumps({}))
  with pytest.raises(UserError, match="holds no checkpoint yet"):
    warm_start.read_source(str(run))
  assert os.listdir(run) == [checkpoint.RUN_MARKER]


def test_sources_saved_on_two_devices_are_read_on_one(tmp_path):
  """A GPU run's folder or export read where fewer devices exist: restored as
  host arrays, not into the saving run's shardings (which Orbax refuses)."""
  assert len(jax.devices()) >= 2
  cfg = _cfg()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(_random_params(cfg), replicated)
  export = str(tmp_path / "export")
  checkpoint.export_weights(export, params, cfg.model.to_dict())
  run = tmp_path / "run"
  checkpoint.prepare_workdir(str(run), cfg.to_json_best_effort(), resume=False,
                             overwrite=False)
  ckpts = checkpoint.Checkpoints(str(run / "checkpoints"), save_every=1, keep=1)
  ckpts.save(3, _fresh_state(params), force=True)
  ckpts.close()
  expected = sum(float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(params))
  script = ("import sys, numpy as np; from stt_jax.train import warm_start\n"
            "for p in sys.argv[1:]:\n"
            "  s = warm_start.read_source(p)\n"
            "  print(s.what, sum(float(np.abs(v).sum()) for v in s.params.values()))\n")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", script, export, str(run)], env=env,
                        cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert [l.rsplit(" ", 1)[0] for l in lines] == ["export", "latest state, step 3, weights"]
  for line in lines:
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(expected, rel=1e-6)
