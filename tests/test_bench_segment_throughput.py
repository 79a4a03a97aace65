"""bench/segment_throughput.py's choice of PyTorch peer modes: a network the
peer cannot build is said before our run, not found after it."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import segment_throughput  # noqa: E402  pylint: disable=g-import-not-at-top

from stt_jax.config import default_config  # noqa: E402  pylint: disable=g-import-not-at-top


def _model(**changes):
  cfg = default_config().model
  for key, value in changes.items():
    cfg[key] = value
  return cfg


def test_auto_picks_by_platform_and_torch():
  choose = segment_throughput.choose_peer_modes
  assert choose("auto", "cpu", True, _model()) == ["eager"]
  assert choose("auto", "gpu", True, _model()) == ["eager", "compile"]
  assert choose("auto", "gpu", False, _model()) == []
  assert choose("off", "gpu", True, _model()) == []
  assert choose("compile", "gpu", True, _model()) == ["compile"]


def test_group_norm_has_a_peer():
  """The demo config's network (GroupNorm) was refused by the peer until
  session 38, after our whole run."""
  assert segment_throughput.choose_peer_modes("auto", "cpu", True,
                                              _model(norm="group")) == ["eager"]


def test_a_network_without_a_peer_is_said_up_front(capsys):
  depth = _model(downsample_z=(True, False, False, False))
  assert segment_throughput.choose_peer_modes("auto", "cpu", True, depth) == []
  assert "no PyTorch peer: the PyTorch peer down-samples in-plane only" in capsys.readouterr().out
  with pytest.raises(SystemExit, match=r"^--peer=eager: the PyTorch peer down-samples"):
    segment_throughput.choose_peer_modes("eager", "cpu", True, depth)
  with pytest.raises(SystemExit, match=r"unknown mode\(s\) \['eagre'\]"):
    segment_throughput.choose_peer_modes("eagre", "cpu", True, _model())
