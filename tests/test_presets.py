"""Ablation presets: every row of Tables 3-5 loads, validates and builds."""

import os
import subprocess
import sys

import pytest

from stt_jax import config as config_lib
from stt_jax import presets
from stt_jax.errors import UserError
from stt_jax.models import unet
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import demo_stt  # noqa: E402  pylint: disable=g-import-not-at-top
import mitoem_r  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_preset_sets_its_row(name):
  design, fusion, denoise, adversarial, _ = presets.PRESETS[name]
  for get_config in (demo_stt.get_config, mitoem_r.get_config):
    cfg = get_config(name)
    assert cfg.model.attention.design == design
    assert cfg.model.attention.fusion == fusion
    assert cfg.model.denoise.enabled == denoise
    assert cfg.loss.adversarial_weight == adversarial
    config_lib.validate(cfg)
    model = unet.from_config(cfg.model)
    assert model.attention_design == design and model.denoise == denoise


def test_baseline_preset_has_no_attention_and_unknown_preset_is_refused():
  assert mitoem_r.get_config("baseline").model.attention.design == "none"
  with pytest.raises(UserError, match="unknown preset 'sst'.*fusion_add"):
    mitoem_r.get_config("sst")


def test_attention_levels_are_checked_only_where_blocks_are_built():
  """A shallower baseline needs no attention settings; an STT-UNET whose SST
  levels do not exist is refused, naming the key."""
  cfg = mitoem_r.get_config("baseline")
  cfg.model.widths, cfg.model.downsample_z = (8, 16, 32), (False, True)
  config_lib.validate(cfg)  # encoder_levels (1, 2, 3, 4) unused by the baseline
  cfg = mitoem_r.get_config("stt")
  cfg.model.widths, cfg.model.downsample_z = (8, 16, 32), (False, True)
  with pytest.raises(UserError, match=r"encoder_levels: levels must lie in 0..2"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("value,ok", [(0.0, True), (0.95, True), (1.0, True), (1.5, False),
                                      (-0.1, False)])
def test_decode_min_mean_mask_is_a_probability(value, ok):
  cfg = mitoem_r.get_config("baseline")
  cfg.decode.min_mean_mask = value
  if ok:
    config_lib.validate(cfg)
  else:
    with pytest.raises(UserError, match=r"decode.min_mean_mask.*must be in \[0, 1\]"):
      config_lib.validate(cfg)


def test_unknown_preset_on_the_command_line_is_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo_stt.py:nope",
                         f"--workdir={tmp_path}/w"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0] == ("error: cannot load --config: unknown preset 'nope'; choose one of "
                      + ", ".join(presets.PRESETS)), lines[0]
  assert not os.path.exists(tmp_path / "w")
