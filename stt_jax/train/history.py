"""`<workdir>/metrics.jsonl`: the run's logged training metrics and its
validations as JSON lines, readable with `tail`, `jq` or pandas where
TensorBoard is not at hand (a cluster node without a forwarded port).

One object per line: {"step", "time" (Unix seconds), "kind": "train" or
"val", then the scalars}. A resumed run first drops the lines of steps after
the one it resumes from (a run killed between saves logged steps it will run
again), so the file is the history of the state that goes on.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time

import numpy as np

FILE = "metrics.jsonl"


def _scalars(values: dict) -> dict:
  """Numbers only (as TensorBoard keeps them; numpy's too), counts as
  integers; NaN and inf as strings, which JSON has no literal for."""
  out = {}
  for key, value in values.items():
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
      continue
    if isinstance(value, numbers.Integral):
      out[key] = int(value)
      continue
    value = float(value)
    out[key] = value if math.isfinite(value) else str(value)
  return out


def with_volume_scalars(scores: dict) -> dict:
  """A validation's scores plus each held-out volume's own AP-50, AP-75,
  Jaccard and Dice ("per_volume", a list, is no scalar) as volume<i>_<key>."""
  return dict(scores, **{f"volume{i}_{key}": volume[key]
                         for i, volume in enumerate(scores.get("per_volume", ()))
                         for key in ("ap_50", "ap_75", "jaccard", "dice")})


class MetricsHistory:
  """Appends to <workdir>/metrics.jsonl; `resumed_from` (a step) first cuts
  the lines after it."""

  def __init__(self, workdir: str, *, resumed_from: int | None = None):
    self.path = os.path.join(workdir, FILE)
    if resumed_from is not None and os.path.exists(self.path):
      self._truncate_after(int(resumed_from))
    self._file = open(self.path, "a", encoding="utf-8")

  def _truncate_after(self, step: int) -> None:
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short by the kill
    temporary = self.path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(temporary, self.path)

  def write(self, kind: str, step: int, values: dict) -> None:
    record = {"step": int(step), "time": round(time.time(), 3), "kind": kind,
              **_scalars(values)}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a kill loses at most the line being written

  def close(self) -> None:
    self._file.close()

