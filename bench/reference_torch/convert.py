"""stt_jax (Flax) parameters -> a PyTorch peer's state_dict, by module name.

Flax kernels: 3D conv [kd, kh, kw, in, out], 2D conv (also the deformable
conv's) [kh, kw, in, out], Dense [in, out]; PyTorch's are [out, in, kd, kh, kw],
[out, in, kh, kw] and [out, in]. LayerNorm's scale is PyTorch's weight.
"""

from __future__ import annotations

import numpy as np
import torch


_KERNEL_ORDER = {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1), 2: (1, 0)}


def flax_to_state_dict(params, dtype=np.float32) -> dict[str, torch.Tensor]:
  out = {}

  def walk(tree, prefix):
    for name, value in tree.items():
      key = f"{prefix}{name}"
      if isinstance(value, dict) or hasattr(value, "items"):
        walk(value, key + ".")
      elif name == "kernel":
        value = np.asarray(value, dtype)
        order = _KERNEL_ORDER.get(value.ndim)
        if order is None:
          raise ValueError(f"no PyTorch layout for {value.ndim}-d kernel {key}")
        out[f"{prefix}weight"] = torch.from_numpy(
            np.ascontiguousarray(np.transpose(value, order)))
      elif name == "scale":
        out[f"{prefix}weight"] = torch.from_numpy(np.asarray(value, dtype).copy())
      elif name == "bias":
        out[f"{prefix}bias"] = torch.from_numpy(np.asarray(value, dtype).copy())
      else:
        raise ValueError(f"no PyTorch counterpart for parameter {key}")
  walk(params, "")
  return out


def load_into(model: torch.nn.Module, params) -> None:
  """Copies `params` into `model`; every trainable tensor must be covered."""
  state = flax_to_state_dict(params)
  missing, unexpected = model.load_state_dict(state, strict=False)
  if missing or unexpected:
    raise ValueError(f"parameter mismatch: missing {missing}, unexpected {unexpected}")
