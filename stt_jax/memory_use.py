"""Memory in use, for the training log and the segment report: the host
process's resident set, and the devices' allocator peak where the backend
keeps one (GPUs and TPUs do; the CPU does not). Also the two glibc malloc
settings that keep a long blockwise run's resident set flat."""

from __future__ import annotations

import functools
import os
import resource
import sys
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


# Transparent huge pages for the host heap. XLA:CPU gets each large buffer
# from malloc, which maps buffers above 32 MiB afresh and unmaps them when
# freed, so every step touches its activations' pages anew: one page fault
# per 4 KiB. With the kernel's THP mode "madvise" (Debian's and Ubuntu's
# default) those pages are 4 KiB unless malloc asks for huge ones, which
# glibc >= 2.35 does when GLIBC_TUNABLES holds glibc.malloc.hugetlb=1. On the
# 2-core dev machine it made the tiny baseline train step 1.4x and its
# forward 1.8x faster (docs/architecture.md, "Huge pages for the host heap").
# glibc reads the tunable once, at process start, hence a restart.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_hugepage_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's THP mode ("always", "madvise" or "never"); None where the
  file is absent (not Linux, or THP not built in)."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError:
    return None
  chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
  return chosen[0] if chosen else None


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library's glibc; None for another libc."""
  try:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
  except (AttributeError, ValueError, OSError):
    return None
  parts = version.split(".")
  if name != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
    return None
  return int(parts[0]), int(parts[1])


def environment_with_hugepages(environ, thp_mode: str | None,
                               glibc: tuple[int, int] | None) -> dict | None:
  """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None
  where that would change nothing: THP mode not "madvise" ("always" gives
  huge pages anyway, "never" none), glibc older than 2.35 or absent, or the
  environment already setting the tunable (=0 is how to turn this off)."""
  if thp_mode != "madvise" or glibc is None or glibc < (2, 35):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(item.partition("=")[0] == HUGEPAGE_TUNABLE for item in tunables.split(":")):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{HUGEPAGE_TUNABLE}=1") if t)
  return env


def restart_with_hugepages() -> None:
  """Re-executes this process (same PID, interpreter and arguments) with
  huge pages for its heap where `environment_with_hugepages` says they are
  missing; returns otherwise, and where the restart fails. Call first thing
  in a command-line entry point: nothing done before it survives."""
  env = environment_with_hugepages(os.environ, transparent_hugepage_mode(),
                                   glibc_version())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    return
