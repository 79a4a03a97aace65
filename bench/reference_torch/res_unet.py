"""The Res-UNET-R baseline in PyTorch, built as the original is (see
../shared/notes/reference-facts.md §2): replicate padding + unpadded convs,
ELU, no normalisation, in-plane stride-2 1x3x3 down-sampling, additive skips,
a fixed depthwise bilinear transposed conv (kernel 1x4x4, weights
[.25, .75, .75, .25], stride (1, 2, 2), padding (0, 1, 1)) for up-sampling.
`norm="group"` adds what stt_jax's `model.norm=group` adds (the demo config
has it): a GroupNorm after every conv but the head, before its ELU or
residual add.

Module names equal the Flax modules' names in stt_jax/models/unet.py so that
`convert.py` maps our parameters onto it one to one. Input/output are
[batch, channels, depth, height, width] (PyTorch's layout); outputs are
logits (mask, contour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def conv(cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)):
  """Replicate padding to "same" size at stride 1, then an unpadded conv."""
  return nn.Conv3d(cin, cout, tuple(kernel), tuple(stride),
                   padding=tuple(k // 2 for k in kernel), padding_mode="replicate")


class Norm(nn.Module):
  """stt_jax's `layers.Norm`: nothing for "none"; for "group" a GroupNorm
  (eps 1e-5, contiguous channel groups, a scale and bias per channel) held
  as `group_norm`, the Flax module's name, so that parameters convert by name."""

  def __init__(self, kind: str, groups: int, channels: int):
    super().__init__()
    if kind not in ("none", "group"):
      raise ValueError(f"unknown normalisation {kind!r}")
    self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5) if kind == "group" else None

  def forward(self, x):
    return x if self.group_norm is None else self.group_norm(x)


def add_conv_norm(parent: nn.Module, name: str, cin: int, cout: int, kernel: Sequence[int],
                  norm: tuple[str, int], stride: Sequence[int] = (1, 1, 1)) -> None:
  """`conv` as parent.<name> and its `Norm` as parent.<name>_norm, stt_jax's
  `conv_then_norm` names; `conv_norm` applies the two."""
  setattr(parent, name, conv(cin, cout, kernel, stride))
  setattr(parent, f"{name}_norm", Norm(norm[0], norm[1], cout))


def conv_norm(parent: nn.Module, name: str, x):
  return getattr(parent, f"{name}_norm")(getattr(parent, name)(x))


class ResidualBlock(nn.Module):
  def __init__(self, cin: int, cout: int, norm: tuple[str, int] = ("none", 4)):
    super().__init__()
    add_conv_norm(self, "conv1", cin, cout, (3, 3, 3), norm)
    add_conv_norm(self, "conv2", cout, cout, (3, 3, 3), norm)
    self.projects = cin != cout
    if self.projects:
      add_conv_norm(self, "project", cin, cout, (1, 1, 1), norm)

  def forward(self, x):
    skip = conv_norm(self, "project", x) if self.projects else x
    return F.elu(conv_norm(self, "conv2", F.elu(conv_norm(self, "conv1", x))) + skip)


class AnisotropicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, norm: tuple[str, int] = ("none", 4)):
    super().__init__()
    add_conv_norm(self, "conv_1x3x3", cin, cout, (1, 3, 3), norm)
    self.residual = ResidualBlock(cout, cout, norm)

  def forward(self, x):
    return self.residual(F.elu(conv_norm(self, "conv_1x3x3", x)))


class BilinearUp(nn.Module):
  """The original's fixed (not trained) in-plane 2x up-sampling."""

  def __init__(self, channels: int):
    super().__init__()
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    weight = torch.outer(taps, taps).reshape(1, 1, 1, 4, 4).repeat(channels, 1, 1, 1, 1)
    self.register_buffer("weight", weight, persistent=False)
    self.channels = channels

  def forward(self, x):
    return F.conv_transpose3d(x, self.weight.to(x.dtype), stride=(1, 2, 2),
                              padding=(0, 1, 1), groups=self.channels)


class ResUNet(nn.Module):
  def __init__(self, widths: Sequence[int] = (28, 36, 48, 64, 80), out_channels: int = 2,
               norm: str = "none", norm_groups: int = 4):
    super().__init__()
    w = list(widths)
    nrm = (norm, norm_groups)
    add_conv_norm(self, "embed", 1, w[0], (1, 5, 5), nrm)
    self.enc0 = AnisotropicBlock(w[0], w[0], nrm)
    for level in range(1, len(w)):
      add_conv_norm(self, f"down{level}", w[level - 1], w[level - 1], (1, 3, 3), nrm,
                    (1, 2, 2))
      setattr(self, f"enc{level}", AnisotropicBlock(w[level - 1], w[level], nrm))
    for level in range(len(w) - 2, -1, -1):
      add_conv_norm(self, f"reduce{level}", w[level + 1], w[level], (1, 1, 1), nrm)
      setattr(self, f"up{level}", BilinearUp(w[level]))
      setattr(self, f"dec{level}", AnisotropicBlock(w[level], w[level], nrm))
    add_conv_norm(self, "skip0", w[0], w[0], (1, 3, 3), nrm)
    self.head = conv(w[0], out_channels, (1, 5, 5))
    self.levels = len(w)
    for m in self.modules():  # the original's init
      if isinstance(m, nn.Conv3d):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)

  def after_encoder(self, level: int, x):  # subclasses add blocks after a stage
    return x

  def after_decoder(self, level: int, x):
    return x

  def forward(self, image):
    x = self.after_encoder(0, self.enc0(F.elu(conv_norm(self, "embed", image))))
    skips = [x]
    for level in range(1, self.levels):
      x = getattr(self, f"enc{level}")(F.elu(conv_norm(self, f"down{level}", x)))
      x = self.after_encoder(level, x)
      skips.append(x)
    x = skips.pop()
    for level in range(self.levels - 2, -1, -1):
      x = getattr(self, f"up{level}")(F.elu(conv_norm(self, f"reduce{level}", x)))
      skip = skips.pop()
      if level == 0:
        skip = F.elu(conv_norm(self, "skip0", skip))
      x = self.after_decoder(level, getattr(self, f"dec{level}")(x + skip))
    return self.head(x)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  """The original's loss: BCE on both channels, per-sample per-channel class
  weights from the positive fraction f (clipped to [0.05, 0.99]); a uniform
  crop weighs 1."""
  dims = tuple(range(2, target.ndim))
  raw = target.mean(dim=dims, keepdim=True)
  f = raw.clamp(0.05, 0.99)
  w_pos = torch.where(f <= 0.5, (1 - f) / f, torch.ones_like(f))
  w_neg = torch.where(f <= 0.5, torch.ones_like(f), f / (1 - f))
  weight = torch.where(target > 0.5, w_pos, w_neg)
  weight = torch.where((raw == 0) | (raw == 1), torch.ones_like(weight), weight)
  return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight)
