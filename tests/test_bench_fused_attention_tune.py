"""bench/fused_attention_tune.py on a tiny shape (Pallas' interpreter): every
variant is timed, compared with the default and saved, best first."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import fused_attention_tune  # noqa: E402  pylint: disable=g-import-not-at-top


def test_a_tiny_sweep_writes_every_variant(tmp_path, capsys):
  fused_attention_tune.main([
      "--shape=1,64,20,1,9", "--dtype=float32", "--forward-tiles=512,1024",
      "--backward-tiles=512", "--warps=4", "--max-runs=1,4", "--repeats=1",
      f"--out-dir={tmp_path}"])
  assert "best forward+gradient" in capsys.readouterr().out
  out = json.load(open(tmp_path / "fused_attention_tune-cpu.json"))
  assert out["shape"] == [1, 64, 20, 1, 9] and "xla_forward+gradient" in out
  rows = out["rows"]
  # backward: each design at the default warps (8) and runs (16), then the
  # fastest design at warps x runs
  assert [r["pass"] for r in rows] == ["forward"] * 2 + ["forward+gradient"] * 5
  backward = [r["tuning"] for r in rows[2:]]
  assert sorted(t["backward"] for t in backward if t["max_runs"] == 16) == sorted(
      fused_attention_tune.fused_attention.BACKWARDS)
  assert {(t["backward_warps"], t["max_runs"]) for t in backward} == {(8, 16), (4, 1), (4, 4)}
  assert len({t["backward"] for t in backward if t["max_runs"] != 16}) == 1
  for pass_ in ("forward", "forward+gradient"):
    times = [r["step_s"] for r in rows if r["pass"] == pass_]
    assert times == sorted(times)
  # other launch parameters, same function (float32: summation order only)
  assert max(r["difference_to_default"] for r in rows) < 1e-5


def test_shapes_the_kernel_does_not_take_are_refused(tmp_path):
  with pytest.raises(SystemExit):
    fused_attention_tune.main(["--shape=1,40,20,1,9", f"--out-dir={tmp_path}"])


def test_unknown_backward_designs_are_refused(tmp_path, capsys):
  with pytest.raises(SystemExit):
    fused_attention_tune.main(["--shape=1,64,20,1,9", "--forward-tiles=512", "--warps=4",
                               "--backwards=query_major,fast", "--repeats=1",
                               f"--out-dir={tmp_path}"])
  assert "--backwards ['fast']" in capsys.readouterr().err
