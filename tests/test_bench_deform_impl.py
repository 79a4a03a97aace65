"""bench/deform_impl.py: its error figures against numpy, and a whole tiny run."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import deform_impl  # noqa: E402  pylint: disable=g-import-not-at-top


def test_relative_errors_are_norms_of_the_difference():
  reference = [np.array([3.0, 4.0]), np.array([1.0, 0.0]), np.array([0.0, 2.0])]
  grads = [np.array([3.0, 4.5]), np.array([1.0, 0.0]), np.array([0.0, -2.0])]
  errors = deform_impl.relative_errors([jnp.asarray(g) for g in grads],
                                       [jnp.asarray(r) for r in reference])
  assert errors == pytest.approx({"x": 0.5 / 5.0, "offsets": 0.0, "kernel": 2.0})


def test_a_tiny_run_writes_every_variant_and_bfloat16_summing_loses_accuracy(tmp_path, capsys):
  deform_impl.main(["--shape=2,16,16,8", "--groups=2", "--repeats=1",
                    f"--out-dir={tmp_path}"])
  printed = capsys.readouterr().out
  assert "float32+sorted" in printed and "float32+tap_major" in printed
  out = json.load(open(tmp_path / "deform_impl-cpu.json"))
  assert out["shape"] == [2, 16, 16, 8] and out["dtype"] == "bfloat16"
  f32, bf16 = out["float32"], out["input"]
  assert f32["step_s"] > 0 and f32["pixels_per_s"] == pytest.approx(2 * 16 * 16 / f32["step_s"])
  # one bfloat16 rounding of each result (~2^-9) bounds the float32 path; the
  # scatter-add summed in bfloat16 rounds every contribution
  assert f32["grad_relative_error"]["x"] < 0.004 < bf16["grad_relative_error"]["x"]
  # sorting or going tap by tap changes the order of the sums, not their value
  for order in ("float32+sorted", "float32+tap_major"):
    for name in ("x", "offsets", "kernel"):
      assert out[order]["grad_relative_error"][name] == pytest.approx(
          f32["grad_relative_error"][name], rel=0.05)


def test_unknown_variants_are_refused():
  with pytest.raises(SystemExit):
    deform_impl.main(["--shape=1,8,8,4", "--groups=1", "--variants=float16"])
  with pytest.raises(SystemExit):  # refused before the first variant runs
    deform_impl.main(["--shape=1,8,8,4", "--groups=1", "--variants=float32,float32+sort"])
