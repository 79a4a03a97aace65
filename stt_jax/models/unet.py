"""Res-UNet (the paper's Table 3 "Baseline", Res-UNET-R style) and STT-UNET.

Input image [batch, depth, height, width, 1] in [0, 1]; output logits
[batch, depth, height, width, 2]: (mitochondria mask, instance contour), and a
third channel, the normalised distance transform, when model.outputs names it.
Down-sampling is in-plane only (stride 1x2x2) at stages where z is coarse;
`downsample_z[i]` makes stage i stride 2 in z too (for isotropic data).

STT-UNET = this network with an SST block (models/attention.py) after the
anisotropic block of the encoder stages in `attention_encoder_levels` and the
decoder stages in `attention_decoder_levels`, and optionally the interpolation
denoiser (models/denoise.py) in front. `attention_design="none"` without the
denoiser is the baseline, parameter for parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from stt_jax import backend
from stt_jax.models.attention import SSTBlock
from stt_jax.models.denoise import InterpolationDenoiser
from stt_jax.models.layers import (AnisotropicBlock, Conv, bilinear_upsample_2x,
                                   conv_then_norm, elu, resolve_conv_impl)


class ResUNet(nn.Module):
  widths: Sequence[int] = (28, 36, 48, 64, 80)
  downsample_z: Sequence[bool] = (False, False, False, False)
  out_channels: int = 2
  conv_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  attention_design: str = "none"
  attention_fusion: str = "deform"
  attention_heads: int = 4
  attention_kv_grid: int = 16
  attention_encoder_levels: Sequence[int] = (1, 2, 3, 4)
  attention_decoder_levels: Sequence[int] = (3, 2, 1)
  deform_groups: int = 4
  deform_modulation: bool = False
  deform_gradient: str = "scatter"
  attention_impl: str = "auto"
  attention_temporal_impl: str = "auto"
  attention_chunks: int = 1
  denoise: bool = False
  denoise_kernel: int = 5
  denoise_features: int = 16
  norm: str = "none"
  norm_groups: int = 4
  # True where the model is only evaluated, never differentiated
  # (`sliding_window.make_predict_fn` sets it): `conv_impl=auto` may then
  # pick conv forms with a fast forward and a slow gradient. Not a weight.
  forward_only: bool = False

  def _sst(self, name: str):
    return SSTBlock(design=self.attention_design, fusion=self.attention_fusion,
                    num_heads=self.attention_heads, kv_grid=self.attention_kv_grid,
                    deform_groups=self.deform_groups,
                    deform_modulation=self.deform_modulation,
                    deform_gradient=self.deform_gradient, dtype=self.dtype,
                    implementation=self.attention_impl,
                    temporal_implementation=self.attention_temporal_impl,
                    chunks=self.attention_chunks, name=name)

  def setup(self):
    if len(self.downsample_z) != len(self.widths) - 1:
      raise ValueError(f"model.downsample_z needs {len(self.widths) - 1} entries "
                       f"(one per down-sampling), got {len(self.downsample_z)}")

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    kw = dict(impl=resolve_conv_impl(self.conv_impl, min(self.widths),
                                     forward_only=self.forward_only),
              dtype=self.dtype)
    block_kw = dict(kw, norm=self.norm, norm_groups=self.norm_groups)

    def conv_norm_elu(features, kernel, name, strides=(1, 1, 1)):
      conv = conv_then_norm(features, kernel, name, strides=strides, **block_kw)
      return lambda v: elu(conv(v))

    attend = self.attention_design != "none"
    if self.denoise:
      image = InterpolationDenoiser(self.denoise_kernel, self.denoise_features,
                                    dtype=self.dtype,
                                    name="denoise")(image)
    x = conv_norm_elu(self.widths[0], (1, 5, 5), "embed")(image)
    x = AnisotropicBlock(self.widths[0], name="enc0", **block_kw)(x)
    if attend and 0 in self.attention_encoder_levels:
      x = self._sst("sst_enc0")(x)
    skips = [x]
    for level, width in enumerate(self.widths[1:], start=1):
      stride = (2 if self.downsample_z[level - 1] else 1, 2, 2)
      x = conv_norm_elu(self.widths[level - 1], (1, 3, 3), f"down{level}", stride)(x)
      x = AnisotropicBlock(width, name=f"enc{level}", **block_kw)(x)
      if attend and level in self.attention_encoder_levels:
        x = self._sst(f"sst_enc{level}")(x)
      skips.append(x)
    x = skips.pop()
    for level in range(len(self.widths) - 2, -1, -1):
      x = conv_norm_elu(self.widths[level], (1, 1, 1), f"reduce{level}")(x)
      x = bilinear_upsample_2x(x, axis=2)
      x = bilinear_upsample_2x(x, axis=3)
      if self.downsample_z[level]:
        x = bilinear_upsample_2x(x, axis=1)
      skip = skips.pop()
      if level == 0:
        skip = conv_norm_elu(self.widths[0], (1, 3, 3), "skip0")(skip)
      x = AnisotropicBlock(self.widths[level], name=f"dec{level}", **block_kw)(x + skip)
      if attend and level in self.attention_decoder_levels:
        x = self._sst(f"sst_dec{level}")(x)
    logits = Conv(self.out_channels, (1, 5, 5), name="head", **kw)(x)
    return logits.astype(jnp.float32)


def input_multiple(downsample_z: Sequence[bool]) -> tuple[int, int, int]:
  """Patch dims must be multiples of this (depth, height, width)."""
  n = len(downsample_z)
  return (2 ** sum(bool(v) for v in downsample_z), 2 ** n, 2 ** n)


def outputs(model_cfg) -> tuple[str, ...]:
  """The output channels' names."""
  return tuple(model_cfg.outputs)


def from_config(model_cfg) -> ResUNet:
  if model_cfg.name != "res_unet":
    raise ValueError(f"model.name must be 'res_unet', got {model_cfg.name!r}")
  att = model_cfg.attention
  return ResUNet(widths=tuple(model_cfg.widths),
                 downsample_z=tuple(bool(v) for v in model_cfg.downsample_z),
                 out_channels=len(outputs(model_cfg)), conv_impl=model_cfg.conv_impl,
                 dtype=backend.compute_dtype(model_cfg.compute_dtype),
                 attention_impl=att.implementation,
                 attention_temporal_impl=att.temporal_implementation,
                 attention_chunks=att.chunks,
                 attention_design=att.design, attention_fusion=att.fusion,
                 attention_heads=att.heads, attention_kv_grid=att.kv_grid,
                 attention_encoder_levels=tuple(att.encoder_levels),
                 attention_decoder_levels=tuple(att.decoder_levels),
                 deform_groups=att.deform_groups,
                 deform_modulation=att.deform_modulation,
                 deform_gradient=att.deform_gradient,
                 denoise=model_cfg.denoise.enabled,
                 denoise_kernel=model_cfg.denoise.kernel_size,
                 denoise_features=model_cfg.denoise.features,
                 norm=model_cfg.norm, norm_groups=model_cfg.norm_groups)
