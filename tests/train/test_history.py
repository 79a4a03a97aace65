"""metrics.jsonl: JSON lines a resume cuts back to the state it goes on from."""

import json
import math

import numpy as np

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
  assert records[0]["count"] == 3 and isinstance(records[0]["count"], int)
  # killed mid-line at step 7, then resumed from a state saved at step 4
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "ti')
  log = history.MetricsHistory(str(tmp_path), resumed_from=4)
  log.write("train", 5, {"loss": np.float32(0.25), "seen": np.int64(7), "ok": np.bool_(True)})
  log.close()
  assert [(r["kind"], r["step"]) for r in _records(tmp_path / "metrics.jsonl")] == [
      ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4), ("train", 5)]
  last = _records(tmp_path / "metrics.jsonl")[-1]  # numpy scalars kept, as numbers
  assert (last["loss"], last["seen"], "ok" in last) == (0.25, 7, False)


def test_each_held_out_volume_gets_its_own_scalars(tmp_path):
  scores = {"jaccard": 0.6, "num_gt": 5, "per_volume": [
      {"ap_50": 0.1, "ap_75": 0.2, "jaccard": 0.3, "dice": 0.4, "volume": "a", "num_gt": 2},
      {"ap_50": 0.5, "ap_75": 0.6, "jaccard": 0.7, "dice": 0.8, "volume": "b", "num_gt": 3}]}
  log = history.MetricsHistory(str(tmp_path))
  log.write("val", 10, history.with_volume_scalars(scores))
  log.close()
  record, = _records(tmp_path / "metrics.jsonl")
  assert record["jaccard"] == 0.6 and "per_volume" not in record
  assert [record[f"volume{i}_{k}"] for i in (0, 1) for k in ("ap_50", "ap_75", "jaccard", "dice")
          ] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
  assert history.with_volume_scalars({"jaccard": 0.6}) == {"jaccard": 0.6}
