"""Res-UNet (the paper's Table 3 "Baseline", Res-UNET-R style).

Input image [batch, depth, height, width, 1] in [0, 1]; output logits
[batch, depth, height, width, 2]: (mitochondria mask, instance contour).
Down-sampling is in-plane only (stride 1x2x2) at stages where z is coarse;
`downsample_z[i]` makes stage i stride 2 in z too (for isotropic data).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from stt_jax.models.layers import AnisotropicBlock, Conv, bilinear_upsample_2x


class ResUNet(nn.Module):
  widths: Sequence[int] = (28, 36, 48, 64, 80)
  downsample_z: Sequence[bool] = (False, False, False, False)
  out_channels: int = 2
  conv_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if len(self.downsample_z) != len(self.widths) - 1:
      raise ValueError(f"model.downsample_z needs {len(self.widths) - 1} entries "
                       f"(one per down-sampling), got {len(self.downsample_z)}")

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    kw = dict(impl=self.conv_impl, dtype=self.dtype)
    x = nn.elu(Conv(self.widths[0], (1, 5, 5), name="embed", **kw)(image))
    x = AnisotropicBlock(self.widths[0], name="enc0", **kw)(x)
    skips = [x]
    for level, width in enumerate(self.widths[1:], start=1):
      stride = (2 if self.downsample_z[level - 1] else 1, 2, 2)
      x = nn.elu(Conv(self.widths[level - 1], (1, 3, 3), stride,
                      name=f"down{level}", **kw)(x))
      x = AnisotropicBlock(width, name=f"enc{level}", **kw)(x)
      skips.append(x)
    x = skips.pop()
    for level in range(len(self.widths) - 2, -1, -1):
      x = nn.elu(Conv(self.widths[level], (1, 1, 1), name=f"reduce{level}", **kw)(x))
      x = bilinear_upsample_2x(x, axis=2)
      x = bilinear_upsample_2x(x, axis=3)
      if self.downsample_z[level]:
        x = bilinear_upsample_2x(x, axis=1)
      skip = skips.pop()
      if level == 0:
        skip = nn.elu(Conv(self.widths[0], (1, 3, 3), name="skip0", **kw)(skip))
      x = AnisotropicBlock(self.widths[level], name=f"dec{level}", **kw)(x + skip)
    logits = Conv(self.out_channels, (1, 5, 5), name="head", **kw)(x)
    return logits.astype(jnp.float32)


def input_multiple(downsample_z: Sequence[bool]) -> tuple[int, int, int]:
  """Patch dims must be multiples of this (depth, height, width)."""
  n = len(downsample_z)
  return (2 ** sum(bool(v) for v in downsample_z), 2 ** n, 2 ** n)


def from_config(model_cfg) -> ResUNet:
  if model_cfg.name != "res_unet":
    raise ValueError(f"model.name must be 'res_unet', got {model_cfg.name!r}")
  return ResUNet(widths=tuple(model_cfg.widths),
                 downsample_z=tuple(bool(v) for v in model_cfg.downsample_z),
                 out_channels=2, conv_impl=model_cfg.conv_impl,
                 dtype=jnp.dtype(model_cfg.compute_dtype))
