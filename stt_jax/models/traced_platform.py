"""Which platform the program being traced is for.

Usually the default backend's; under an abstract mesh with a device (how a
program is compiled for a GPU on a machine without one, bench/gpu_compile.py)
that device's. Layers that pick a form per platform (the same function,
another program) ask here at trace time.
"""

from __future__ import annotations

import jax

_FAMILIES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


def name() -> str:
  """'cpu', 'gpu' or 'tpu' (another platform: its own name)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return _FAMILIES.get(platform, platform)
