"""Compile a function once, ahead of time, and time that very program: the
bench scripts that compare implementations of one piece read the times (and
the compiled text) of the executable they ran."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np


@dataclasses.dataclass
class Timed:
  compiled: jax.stages.Compiled  # e.g. .as_text() to count kernels
  compile_s: float
  step_s: float                  # median of the timed runs
  outputs: object                # of the first (untimed) run


def compile_and_time(fn, args, repeats: int) -> Timed:
  """jit(fn) lowered and compiled for `args`, run once, then `repeats` timed runs."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  outputs = jax.block_until_ready(compiled(*args))
  step_s = time_interleaved([(compiled, args)], repeats)[0] if repeats else float("nan")
  return Timed(compiled, compile_s, step_s, outputs)


def time_interleaved(runs, repeats: int) -> list[float]:
  """Median seconds of each (compiled, args) in `runs`, timed round-robin
  (A B C A B C ...): on a shared or throttling machine a slow spell then
  lands on every program alike, not on whichever ran during it (this 2-core
  VM's step times drift by 15-30 % from minute to minute)."""
  times = [[] for _ in runs]
  for _ in range(repeats):
    for (compiled, args), out in zip(runs, times):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      out.append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]
