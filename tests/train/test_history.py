"""metrics.jsonl: JSON lines a resume cuts back to the state it goes on from."""

import json
import math

from stt_jax.train import history


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_lines_are_scalars_and_a_resume_drops_the_steps_after_it(tmp_path):
  log = history.MetricsHistory(str(tmp_path))
  for step in range(1, 7):
    log.write("train", step, {"loss": 1.0 / step, "nested": {"a": 1}, "name": "x",
                              "flag": True, "count": 3})
  log.write("val", 4, {"jaccard": 0.5, "ap_75": math.nan})
  log.close()
  records = _records(tmp_path / "metrics.jsonl")
  assert [(r["kind"], r["step"]) for r in records] == [
      ("train", s) for s in range(1, 7)] + [("val", 4)]
  assert set(records[0]) == {"step", "time", "kind", "loss", "count"}
  assert records[5]["loss"] == 1.0 / 6 and records[-1]["ap_75"] == "nan"
  # killed mid-line at step 7, then resumed from a state saved at step 4
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "ti')
  log = history.MetricsHistory(str(tmp_path), resumed_from=4)
  log.write("train", 5, {"loss": 0.25})
  log.close()
  assert [(r["kind"], r["step"]) for r in _records(tmp_path / "metrics.jsonl")] == [
      ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4), ("train", 5)]
