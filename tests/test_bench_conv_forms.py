"""bench/conv_forms.py: a tiny run writes every form, each computing the conv."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import conv_forms  # noqa: E402  pylint: disable=g-import-not-at-top


def test_parse_conv_reads_input_kernel_and_channels():
  assert conv_forms.parse_conv("2x18x130x130:3x3x3:12-16") == (
      (2, 18, 130, 130, 12), (3, 3, 3, 12, 16))
  with pytest.raises(SystemExit, match="bad conv '2x18x130:3x3x3:12-16'"):
    conv_forms.parse_conv("2x18x130:3x3x3:12-16")


def test_a_tiny_run_times_every_form_and_each_matches_native(tmp_path, capsys):
  conv_forms.main(["--convs=1x5x10x10:3x3x3:3-4,1x4x12x12:1x5x5:3-2", "--repeats=1",
                   f"--out-dir={tmp_path}"])
  assert "wrote" in capsys.readouterr().out
  out = json.load(open(tmp_path / "conv_forms-cpu.json"))
  assert [row["kernel"] for row in out["convs"]] == [[3, 3, 3, 3, 4], [1, 5, 5, 3, 2]]
  for row in out["convs"]:
    assert set(row["forms"]) == set(conv_forms.FORMS)
    for form, timing in row["forms"].items():
      assert timing["forward_s"] > 0 and timing["forward_and_grad_s"] > 0, form
      assert timing["max_relative_error"] < 1e-5, form
