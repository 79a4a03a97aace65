"""bench/ynn_reductions.py end to end on a small baseline: both programs of
each pass compute the same value, the one without YNNPACK's reductions has
fewer YNNPACK fusions, all are timed, the JSON lands where asked."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_baseline_with_and_without_ynnpack_reductions(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-u", os.path.join(ROOT, "bench", "ynn_reductions.py"),
       "--presets=baseline", "--patch=2,64,64", "--batch=1", "--rounds=2",
       "--override=model.widths=(4,4,8,8,8)", "--override=model.norm=group",
       f"--out-dir={tmp_path}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = tmp_path.glob("ynn_reductions-*.json")
  out = json.loads(path.read_text())
  assert out["xla_flags"].endswith("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
  rows = out["rows"]
  assert [(r["pass"], r["reductions"]) for r in rows] == [
      ("forward", "ynnpack"), ("forward", "xla"), ("gradient", "ynnpack"), ("gradient", "xla")]
  for with_, without in zip(rows[::2], rows[1::2]):
    assert abs(with_["value"] - without["value"]) <= 1e-5 * abs(without["value"]) + 1e-7
    assert with_["ynn_fusions"] > without["ynn_fusions"]
    assert with_["ms"] > 0 and without["ms"] > 0
  assert "YNNPACK's reductions" in proc.stdout
