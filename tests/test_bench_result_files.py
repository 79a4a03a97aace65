"""bench/result_files.py: results files' names, and writes that a kill cannot half-do."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import result_files  # noqa: E402  pylint: disable=g-import-not-at-top


def test_results_path_names_the_device_and_creates_the_folder(tmp_path):
  path = result_files.results_path("vs_torch-train", "NVIDIA H200", str(tmp_path / "new"))
  assert path == str(tmp_path / "new" / "vs_torch-train-nvidia_h200.json")
  assert os.path.isdir(tmp_path / "new")


def test_override_tag_keeps_only_the_last_key_part_and_safe_characters():
  assert result_files.override_tag(["model.attention.deform_gradient=sorted",
                                    "model.widths=(8, 16)"]) == \
      "-deform_gradient_sorted-widths__8_16_"
  assert result_files.settings_tag("auto", 1, []) == ""
  assert result_files.settings_tag("cudnn", 4, []) == "-attention_cudnn-chunks_4"


def test_write_json_writes_says_so_and_leaves_no_partial_file(tmp_path, capsys):
  path = str(tmp_path / "out.json")
  assert result_files.write_json(path, {"rows": [1.5, 2]}, indent=1) == path
  with open(path) as f:
    assert json.load(f) == {"rows": [1.5, 2]}
  assert capsys.readouterr().out == f"wrote {path}\n"  # outside the repo: the whole path
  assert os.listdir(tmp_path) == ["out.json"]
  result_files.write_json(path, {"rows": []}, quiet=True)
  assert capsys.readouterr().out == ""
  with open(path) as f:
    assert json.load(f) == {"rows": []}


def test_write_json_that_fails_midway_keeps_the_previous_file_whole(tmp_path):
  path = str(tmp_path / "out.json")
  result_files.write_json(path, {"measured": [1, 2, 3]}, quiet=True)
  with pytest.raises(TypeError):  # the second row cannot be written: after the first was
    result_files.write_json(path, {"measured": [1, 2, 3], "more": [4, object()]})
  with open(path) as f:
    assert json.load(f) == {"measured": [1, 2, 3]}
  assert os.listdir(tmp_path) == ["out.json"]


def test_write_json_names_a_file_inside_the_repo_from_its_root(capsys):
  inside = os.path.join(ROOT, "bench", "results")
  result_files.announce(os.path.join(inside, "x-cpu.json"))
  assert capsys.readouterr().out == "wrote bench/results/x-cpu.json\n"
