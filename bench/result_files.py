"""Where the bench scripts write: bench/results/<stem>-<device>.json."""

from __future__ import annotations

import json
import os
import re

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def write_json(path: str, obj, *, indent: int = 2, default=None, quiet: bool = False) -> str:
  """Writes obj to path as JSON and says so ("wrote <path from the repo
  root>") unless quiet; returns path.

  Through a temporary file renamed over path: the scripts that save after
  every row, and vs_torch.py --add-flops that rewrites a GPU run's file in
  place, leave the previous file whole when they are killed mid-write.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + ".partial"
  try:
    with open(partial, "w") as f:
      json.dump(obj, f, indent=indent, default=default)
  except BaseException:
    if os.path.exists(partial):
      os.unlink(partial)
    raise
  os.replace(partial, path)
  if not quiet:
    announce(path)
  return path


def announce(path: str) -> None:
  """Prints "wrote <path>", relative to the repo root where it lies inside."""
  shown = os.path.relpath(path, ROOT)
  print(f"wrote {path if shown.startswith('..') else shown}", flush=True)
