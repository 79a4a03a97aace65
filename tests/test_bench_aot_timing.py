"""bench/aot_timing.py: programs timed round-robin, each its own median."""

import os
import sys
from unittest import mock

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import aot_timing  # noqa: E402  pylint: disable=g-import-not-at-top


def test_programs_run_round_robin_and_get_their_own_medians():
  calls = []
  program = lambda name: (lambda x: calls.append((name, x)) or x)
  # a fake clock: each run of "a" takes 1 s, of "b" 3 s, but the second
  # round is slowed down by 10 s for both (a slow spell of the machine)
  stamps = [0.0]
  for duration in (1, 3, 11, 13, 1, 3):   # each run reads the clock at its start and end
    stamps += [stamps[-1], stamps[-1] + duration]
  clock = iter(stamps[1:])
  with mock.patch.object(aot_timing.time, "perf_counter", lambda: float(next(clock))):
    medians = aot_timing.time_interleaved([(program("a"), (1,)), (program("b"), (2,))], 3)
  assert calls == [("a", 1), ("b", 2)] * 3
  assert medians == [pytest.approx(1.0), pytest.approx(3.0)]
