"""bench/attention_forms.py on tiny shapes: every form timed, each agreeing
with the first, the JSON written; a malformed shape is a one-line error."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import attention_forms  # noqa: E402  pylint: disable=g-import-not-at-top


def test_forms_agree_and_land_in_the_results_file(tmp_path, capsys):
  attention_forms.main(["--shapes=3,4,4,2,4;2,9,5,2,3;1,3,33,2,2",
                        "--impls=heads_major,unrolled,xla",
                        "--repeats=2", "--tag=t", f"--out-dir={tmp_path}"])
  (path,) = tmp_path.glob("attention_forms-t-*.json")
  rows = json.loads(path.read_text())["rows"]
  # 33 keys: past attention.UNROLLED_MOST_KEYS, where "unrolled" is not unrolled
  assert [(r["shape"], r["impl"]) for r in rows] == [
      ([b, q, k, 2, d], impl) for b, q, k, d in ((3, 4, 4, 4), (2, 9, 5, 3))
      for impl in ("heads_major", "unrolled", "xla")] + [
          ([1, 3, 33, 2, 2], impl) for impl in ("heads_major", "xla")]
  for r in rows:
    assert r["max_abs_difference"] < 1e-5
    assert r["forward_ms"] > 0 and r["gradient_ms"] > 0
  assert "unrolled" in capsys.readouterr().out


def test_a_malformed_shape_or_form_is_a_one_line_error():
  with pytest.raises(SystemExit, match="not batch,queries,keys,heads,dim"):
    attention_forms.main(["--shapes=3,4,4,2"])
  with pytest.raises(SystemExit):
    attention_forms.main(["--impls=fastest"])
