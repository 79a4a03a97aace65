"""memory_use: the glibc arena cap, counted by glibc's own malloc_stats."""

import os
import subprocess
import sys

import pytest

from stt_jax import memory_use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Eight threads each allocate while all are alive (an arena goes back to the
# free list only when its thread ends), then malloc_stats prints one
# "Arena N:" section per arena to stderr.
_COUNT_ARENAS = """
import ctypes, sys, threading
from stt_jax import memory_use
print(memory_use.limit_heap_arenas(int(sys.argv[1])))
barrier = threading.Barrier(9)
held = []
def allocate():
  held.append(bytearray(1 << 14))  # malloc from this thread's arena
  barrier.wait()
  barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
  t.start()
barrier.wait()
ctypes.CDLL("libc.so.6").malloc_stats()
barrier.wait()
for t in threads:
  t.join()
"""


def _arenas(cap: int, env_arenas: str | None = None) -> tuple[bool, int]:
  env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
  if env_arenas is not None:
    env["MALLOC_ARENA_MAX"] = env_arenas
  env["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, "-c", _COUNT_ARENAS, str(cap)], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
  arenas = sum(line.startswith("Arena ") for line in out.stderr.splitlines())
  return out.stdout.strip() == "True", arenas


@pytest.mark.skipif(memory_use._libc() is None, reason="not glibc")  # pylint: disable=protected-access
def test_heap_arenas_are_capped_unless_the_environment_chose():
  applied, uncapped = _arenas(0)
  assert not applied and uncapped > 2, uncapped  # glibc: one arena per thread here
  for cap in (1, 2):
    applied, arenas = _arenas(cap)
    assert applied and 1 <= arenas <= cap, (cap, arenas)
  applied, arenas = _arenas(1, env_arenas="3")  # MALLOC_ARENA_MAX wins
  assert not applied and arenas == 3, arenas
