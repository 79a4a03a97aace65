"""memory_use: the glibc arena cap, counted by glibc's own malloc_stats; the
restart with huge pages, counted by the kernel's AnonHugePages."""

import json
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


# Restarts itself with huge pages where the machine offers them, then fills
# 256 MiB from malloc (one mmap'd block) and reports how much of its memory
# the kernel backs with huge pages.
_FILL_HEAP = """
import json, os, sys
from stt_jax import memory_use
memory_use.restart_with_hugepages()
block = bytearray(256 << 20)
huge_kb = 0
with open("/proc/self/smaps_rollup") as f:
  for line in f:
    if line.startswith("AnonHugePages:"):
      huge_kb = int(line.split()[1])
print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], huge_kb]))
"""


def _fill_heap(tunables: str | None):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  env["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, "-c", _FILL_HEAP, "kept", "--flag=1"], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
  return json.loads(out.stdout)


@pytest.mark.skipif(
    memory_use.environment_with_hugepages(
        {}, memory_use.transparent_hugepage_mode(), memory_use.glibc_version()) is None
    or not os.path.exists("/proc/self/smaps_rollup"),
    reason="this machine's kernel (THP mode not madvise) or C library (not glibc "
    ">= 2.35) leaves nothing to turn on")
def test_restart_gives_the_heap_huge_pages_and_keeps_the_arguments():
  tunables, argv, huge_kb = _fill_heap(None)
  assert tunables == "glibc.malloc.hugetlb=1", tunables
  assert argv == ["kept", "--flag=1"], argv
  assert huge_kb >= 128 << 10, huge_kb  # most of the 256 MiB block
  # the environment's own choice wins: no restart, 4 KiB pages
  tunables, argv, huge_kb = _fill_heap("glibc.malloc.hugetlb=0")
  assert tunables == "glibc.malloc.hugetlb=0" and huge_kb < 16 << 10, (tunables, huge_kb)


def test_hugepage_environment_is_added_only_where_it_changes_something():
  added = memory_use.environment_with_hugepages({"A": "1"}, "madvise", (2, 36))
  assert added == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  kept = memory_use.environment_with_hugepages(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35))
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for environ, mode, glibc in [
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36)),  # opted out
      ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"}, "madvise", (2, 36)),  # set
      ({}, "always", (2, 36)),  # the kernel gives huge pages anyway
      ({}, "never", (2, 36)),  # nor at all
      ({}, None, (2, 36)),  # no THP
      ({}, "madvise", (2, 34)),  # glibc without the tunable
      ({}, "madvise", None)]:  # another C library
    assert memory_use.environment_with_hugepages(environ, mode, glibc) is None, (
        environ, mode, glibc)


def test_transparent_hugepage_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  for text, mode in [("always [madvise] never\n", "madvise"),
                     ("[always] madvise never\n", "always"),
                     ("always madvise [never]\n", "never")]:
    path.write_text(text)
    assert memory_use.transparent_hugepage_mode(str(path)) == mode
  assert memory_use.transparent_hugepage_mode(str(tmp_path / "absent")) is None
