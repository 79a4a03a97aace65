"""Memory in use, for the training log and the segment report: the host
process's resident set, and the devices' allocator peak where the backend
keeps one (GPUs and TPUs do; the CPU does not)."""

from __future__ import annotations

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
