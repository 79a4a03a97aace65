"""STT-UNET in PyTorch: the benchmark peer of stt_jax's ResUNet with SST
blocks and the interpolation denoiser (stt_jax/models/{unet,attention,
denoise,deformable_conv}.py), written the way a PyTorch user would write it:
`F.scaled_dot_product_attention` for both attention streams and
`torchvision.ops.deform_conv2d` for the deformable fusion.

It computes our function (checked in bench/vs_torch.py on converted weights):
LayerNorm eps 1e-6 (Flax's), sinusoidal position encodings split t/y/x,
spatial keys/values average-pooled with "SAME" padding that does not count
the padding, zero-padded "SAME" 2D convs in the denoiser and the offset
predictor, offsets laid out (group, tap, dy/dx) as torchvision expects.
Module names equal the Flax modules' names, so `convert.py` maps parameters
one to one. Input/output [batch, channels, depth, height, width].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from bench.reference_torch.res_unet import ResUNet


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
  half = max(dim // 2, 1)
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None, :]
  enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
  return enc[:, :dim] if enc.shape[-1] >= dim else F.pad(enc, (0, dim - enc.shape[-1]))


def position_encoding(t: int, h: int, w: int, dim: int) -> torch.Tensor:
  """[t, h, w, dim]: a third of the channels each for t, y and x."""
  d_t = dim // 3
  d_y = (dim - d_t) // 2
  d_x = dim - d_t - d_y
  return torch.cat([
      sinusoidal_encoding(t, d_t)[:, None, None].expand(t, h, w, d_t),
      sinusoidal_encoding(h, d_y)[None, :, None].expand(t, h, w, d_y),
      sinusoidal_encoding(w, d_x)[None, None, :].expand(t, h, w, d_x)], dim=-1)


def avg_pool_same(x: torch.Tensor, r: int) -> torch.Tensor:
  """x [n, c, h, w]: r x r windows, stride r, "SAME" padding not counted."""
  h, w = x.shape[-2:]
  pad_h = max((math.ceil(h / r) - 1) * r + r - h, 0)
  pad_w = max((math.ceil(w / r) - 1) * r + r - w, 0)
  pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
  sums = F.avg_pool2d(F.pad(x, pads), r, r)
  if not any(pads):
    return sums
  ones = F.pad(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), pads)
  return sums / F.avg_pool2d(ones, r, r)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
  """[n, length, c] -> [n, heads, length, c / heads]."""
  n, length, c = x.shape
  return x.reshape(n, length, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
  n, heads, length, d = x.shape
  return x.transpose(1, 2).reshape(n, length, heads * d)


class SpatialAttention(nn.Module):
  def __init__(self, c: int, heads: int, kv_grid: int):
    super().__init__()
    self.query, self.key, self.value, self.out = (nn.Linear(c, c) for _ in range(4))
    self.heads, self.kv_grid = heads, kv_grid

  def forward(self, x):  # [b, t, h, w, c]
    b, t, h, w, c = x.shape
    planes = x.reshape(b * t, h, w, c)
    r = max(1, math.ceil(max(h, w) / self.kv_grid))
    pooled = planes if r == 1 else avg_pool_same(
        planes.permute(0, 3, 1, 2), r).permute(0, 2, 3, 1)
    kv = pooled.reshape(b * t, -1, c)
    q = _heads(self.query(planes.reshape(b * t, h * w, c)), self.heads)
    out = F.scaled_dot_product_attention(q, _heads(self.key(kv), self.heads),
                                         _heads(self.value(kv), self.heads))
    return self.out(_merge(out)).reshape(b, t, h, w, c)


class TemporalAttention(nn.Module):
  def __init__(self, c: int, heads: int):
    super().__init__()
    self.query, self.key, self.value, self.out = (nn.Linear(c, c) for _ in range(4))
    self.heads = heads

  def forward(self, x):  # [b, t, h, w, c]
    b, t, h, w, c = x.shape
    seq = x.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
    q, k, v = (_heads(m(seq), self.heads) for m in (self.query, self.key, self.value))
    out = self.out(_merge(F.scaled_dot_product_attention(q, k, v)))
    return out.reshape(b, h, w, t, c).permute(0, 3, 1, 2, 4)


class DeformableConv(nn.Module):
  """3x3 deformable conv of x whose offsets a zero-initialised conv predicts
  from a guide (torchvision's kernel; zero outside the image)."""

  def __init__(self, c: int, groups: int, modulation: bool = False, k: int = 3):
    super().__init__()
    self.offset_conv = nn.Conv2d(c, groups * k * k * (3 if modulation else 2), k,
                                 padding=k // 2)
    nn.init.zeros_(self.offset_conv.weight)
    nn.init.zeros_(self.offset_conv.bias)
    self.weight = nn.Parameter(torch.empty(c, c, k, k))
    nn.init.kaiming_normal_(self.weight)
    self.bias = nn.Parameter(torch.zeros(c))
    self.groups, self.modulation, self.k = groups, modulation, k

  def forward(self, x, guide):  # [n, c, h, w] each
    predict = self.offset_conv(guide)
    n_off = self.groups * self.k * self.k * 2
    mask = 2.0 * torch.sigmoid(predict[:, n_off:]) if self.modulation else None
    return deform_conv2d(x, predict[:, :n_off], self.weight, self.bias,
                         padding=self.k // 2, mask=mask)


class SSTBlock(nn.Module):
  """x + proj(fuse(spatial(y), temporal(y))), y = LayerNorm(x) + positions."""

  def __init__(self, c: int, design: str = "split", fusion: str = "deform", heads: int = 4,
               kv_grid: int = 16, deform_groups: int = 4, deform_modulation: bool = False):
    super().__init__()
    heads = math.gcd(heads, c)
    self.norm = nn.LayerNorm(c, eps=1e-6)
    self.spatial = SpatialAttention(c, heads, kv_grid)
    self.temporal = TemporalAttention(c, heads)
    if design == "split" and fusion == "concat":
      self.concat_fuse = nn.Linear(2 * c, c)
    elif design == "split" and fusion == "deform":
      self.deform_fuse = DeformableConv(c, math.gcd(deform_groups, c), deform_modulation)
    self.proj = nn.Linear(c, c)
    nn.init.zeros_(self.proj.weight)
    nn.init.zeros_(self.proj.bias)
    self.design, self.fusion = design, fusion

  def forward(self, x):  # [b, c, t, h, w]
    x = x.permute(0, 2, 3, 4, 1)
    b, t, h, w, c = x.shape
    y = self.norm(x) + position_encoding(t, h, w, c).to(x.device, x.dtype)
    if self.design == "spatial_then_temporal":
      fused = self.temporal(self.spatial(y))
    elif self.design == "temporal_then_spatial":
      fused = self.spatial(self.temporal(y))
    else:
      xs, xt = self.spatial(y), self.temporal(y)
      if self.fusion == "add":
        fused = xs + xt
      elif self.fusion == "concat":
        fused = self.concat_fuse(torch.cat([xs, xt], dim=-1))
      else:
        planes = lambda v: v.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        fused = self.deform_fuse(planes(xs), planes(xt)).permute(0, 2, 3, 1)
        fused = fused.reshape(b, t, h, w, c)
    out = x + self.proj(fused).to(x.dtype)
    return out.permute(0, 4, 1, 2, 3)


class InterpolationDenoiser(nn.Module):
  """Per-pixel k x k kernels on the adjacent slices, gated against the slice."""

  def __init__(self, kernel_size: int = 5, features: int = 16):
    super().__init__()
    self.conv0 = nn.Conv2d(3, features, 3, padding=1)
    self.conv1 = nn.Conv2d(features, features, 3, padding=1)
    self.kernels = nn.Conv2d(features, 2 * kernel_size ** 2 + 1, 3, padding=1)
    nn.init.zeros_(self.kernels.weight)
    with torch.no_grad():
      self.kernels.bias.zero_()
      self.kernels.bias[-1] = -4.0
    self.k = kernel_size

  def _neighbourhoods(self, planes):  # [n, h, w] -> [n, k*k, h, w], edge-padded
    n, h, w = planes.shape
    r = self.k // 2
    padded = F.pad(planes[:, None], (r, r, r, r), mode="replicate")
    return F.unfold(padded, self.k).reshape(n, self.k * self.k, h, w)

  def forward(self, image):  # [b, 1, t, h, w]
    b, _, t, h, w = image.shape
    x = image[:, 0]
    prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
    stack = torch.stack([prev, x, nxt], dim=2).reshape(b * t, 3, h, w)
    f = F.elu(self.conv1(F.elu(self.conv0(stack))))
    head = self.kernels(f).float()
    k2 = self.k * self.k
    weights = torch.softmax(head[:, :2 * k2], dim=1)
    gate = torch.sigmoid(head[:, -1])
    restored = ((weights[:, :k2] * self._neighbourhoods(prev.reshape(b * t, h, w).float())).sum(1)
                + (weights[:, k2:] * self._neighbourhoods(nxt.reshape(b * t, h, w).float())).sum(1))
    out = (1 - gate) * x.reshape(b * t, h, w).float() + gate * restored
    return out.reshape(b, 1, t, h, w).to(image.dtype)


class STTUNet(ResUNet):
  """The Res-UNET-R with SST blocks after the anisotropic blocks of the given
  encoder/decoder stages and, optionally, the denoiser in front."""

  def __init__(self, widths: Sequence[int] = (28, 36, 48, 64, 80), out_channels: int = 2,
               design: str = "split", fusion: str = "deform", heads: int = 4,
               kv_grid: int = 16, encoder_levels: Sequence[int] = (1, 2, 3, 4),
               decoder_levels: Sequence[int] = (3, 2, 1), deform_groups: int = 4,
               deform_modulation: bool = False, denoise: bool = True,
               denoise_kernel: int = 5, denoise_features: int = 16, norm: str = "none",
               norm_groups: int = 4):
    super().__init__(widths, out_channels, norm, norm_groups)
    block = lambda c: SSTBlock(c, design, fusion, heads, kv_grid, deform_groups,
                               deform_modulation)
    self.encoder_levels, self.decoder_levels = tuple(encoder_levels), tuple(decoder_levels)
    for level in self.encoder_levels:
      setattr(self, f"sst_enc{level}", block(widths[level]))
    for level in self.decoder_levels:
      setattr(self, f"sst_dec{level}", block(widths[level]))
    self.denoise = InterpolationDenoiser(denoise_kernel, denoise_features) if denoise else None

  def after_encoder(self, level: int, x):
    return getattr(self, f"sst_enc{level}")(x) if level in self.encoder_levels else x

  def after_decoder(self, level: int, x):
    return getattr(self, f"sst_dec{level}")(x) if level in self.decoder_levels else x

  def forward(self, image):
    return super().forward(image if self.denoise is None else self.denoise(image))
