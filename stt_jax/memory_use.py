"""Memory in use, for the training log and the segment report: the host
process's resident set, and the devices' allocator peak where the backend
keeps one (GPUs and TPUs do; the CPU does not). Also the two glibc malloc
settings that keep a long blockwise run's resident set flat."""

from __future__ import annotations

import functools
import os
import resource
from collections.abc import Iterable

_MB = 2.0 ** 20


def resident_mb() -> float | None:
  """Resident set of this process now, MiB; None off Linux."""
  try:
    with open("/proc/self/statm") as f:
      pages = int(f.read().split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return pages * resource.getpagesize() / _MB


def peak_resident_mb() -> float:
  """Largest resident set this process has had, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb(devices: Iterable) -> float | None:
  """Largest allocator peak over `devices` (this process's), MiB; None where
  the backend keeps none."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      return None  # a backend without the query
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / _MB if peaks else None


@functools.lru_cache(maxsize=1)
def _libc():
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    libc = ctypes.CDLL("libc.so.6")
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
  except OSError:  # not glibc: nothing to do
    return None


def return_free_heap() -> None:
  """Hands freed heap pages back to the OS (glibc keeps them otherwise).
  Called after every block: without it a predict stage's peak resident set
  grew with the block count (568 MB at 27 blocks, 623 MB at 216), freed
  buffers of many sizes held, never reused whole; with it 517 vs 510 MB
  (bench/segment_memory.py). A few ms on a 400 MB heap; blocks take seconds."""
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_heap_arenas(arenas: int) -> bool:
  """Caps glibc's malloc arenas at `arenas` (0: glibc's default, 8 per
  core), unless MALLOC_ARENA_MAX in the environment already chose. Each
  thread that allocates gets an arena of its own up to the cap, and freed
  memory stays in the arena that held it: TensorStore's reader threads
  left ~60 MB of such pages behind in a 216-block watershed pass, which a
  cap of 1-2 removes at no measured cost in time. Returns whether the cap
  was set (must come before those threads start)."""
  if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
    return False
  libc = _libc()
  return libc is not None and libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
