"""The PyTorch peer of an stt_jax model config (cfg.model)."""

from __future__ import annotations


def unsupported(model_cfg) -> str | None:
  """Why the peer cannot be built for `model_cfg` (one line), or None. Needs
  no PyTorch, so a driver can say it before it runs anything."""
  if any(model_cfg.downsample_z):
    return "the PyTorch peer down-samples in-plane only (model.downsample_z all False)"
  if model_cfg.norm not in ("none", "group"):
    return f"the PyTorch peer has no model.norm={model_cfg.norm!r} (none or group)"
  return None


def from_config(model_cfg):
  """ResUNet for the baseline (no attention, no denoiser), else STTUNet."""
  from bench.reference_torch.res_unet import ResUNet  # pylint: disable=g-import-not-at-top
  from bench.reference_torch.stt_unet import STTUNet  # pylint: disable=g-import-not-at-top
  reason = unsupported(model_cfg)
  if reason:
    raise ValueError(reason)
  widths = tuple(model_cfg.widths)
  outputs = len(tuple(model_cfg.outputs))
  norm = dict(norm=model_cfg.norm, norm_groups=model_cfg.norm_groups)
  a, d = model_cfg.attention, model_cfg.denoise
  if a.design == "none" and not d.enabled:
    return ResUNet(widths, outputs, **norm)
  return STTUNet(widths, outputs, design=a.design, fusion=a.fusion, heads=a.heads,
                 kv_grid=a.kv_grid,
                 encoder_levels=a.encoder_levels if a.design != "none" else (),
                 decoder_levels=a.decoder_levels if a.design != "none" else (),
                 deform_groups=a.deform_groups, deform_modulation=a.deform_modulation,
                 denoise=d.enabled, denoise_kernel=d.kernel_size, denoise_features=d.features,
                 **norm)


def channels_last(model):
  """Channels-last weights: 3D convs NDHWC, 2D convs (denoiser, offsets) NHWC."""
  import torch  # pylint: disable=g-import-not-at-top
  for m in model.modules():
    if isinstance(m, torch.nn.Conv3d):
      m.to(memory_format=torch.channels_last_3d)
    elif isinstance(m, torch.nn.Conv2d):
      m.to(memory_format=torch.channels_last)
  return model
