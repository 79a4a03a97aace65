"""Where the bench scripts write: bench/results/<stem>-<device>.json."""

from __future__ import annotations

import os
import re

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_tag(device_kind: str) -> str:
  """'NVIDIA H200' -> 'nvidia_h200' (the part of a results file's name that
  says which device measured it)."""
  return device_kind.replace(" ", "_").lower()


def results_path(stem: str, device_kind: str, out_dir: str = RESULTS_DIR) -> str:
  """out_dir/<stem>-<device tag>.json, out_dir created."""
  os.makedirs(out_dir, exist_ok=True)
  return os.path.join(out_dir, f"{stem}-{device_tag(device_kind)}.json")


def settings_tag(attention_impl: str, chunks: int, overrides) -> str:
  """The part of a results file's name that says how our programs ran, so
  that no setting's run overwrites another's: "-attention_<impl>" unless
  auto, "-chunks_<n>" unless 1, then override_tag's."""
  tag = "" if attention_impl == "auto" else f"-attention_{attention_impl}"
  tag += "" if chunks == 1 else f"-chunks_{chunks}"
  return tag + override_tag(overrides)


def override_tag(overrides) -> str:
  """The part of a results file's name that says which config overrides ran:
  ["model.attention.deform_gradient=sorted"] -> "-deform_gradient_sorted"."""
  tag = ""
  for item in overrides:
    key, _, value = item.partition("=")
    tag += "-" + re.sub(r"[^A-Za-z0-9_.]+", "_", f"{key.rpartition('.')[2]}_{value}")
  return tag
