"""Image volume -> probabilities -> instances, written to zarr."""

from __future__ import annotations

import os

import numpy as np

from stt_jax import paths
from stt_jax.data import sources
from stt_jax.infer import postprocess, sliding_window


def prepare_output_dir(out_dir: str, overwrite: bool) -> str:
  out_dir = paths.clear_for_output(out_dir, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def segment(cfg, predict_fn, params, image: sources.Volume, mesh,
            out_dir: str) -> np.ndarray:
  """Segments `image`; writes probabilities.zarr ([z, y, x, 2] uint8, mask and
  contour x 255) and instances.zarr (uint32) under `out_dir` (which the
  caller prepared). Returns the instance labels [depth, height, width]."""
  probs = sliding_window.predict_volume(
      predict_fn, params, image, mesh, window=cfg.infer.window,
      overlap=cfg.infer.overlap, batch_size=cfg.infer.batch_size)
  probs_u8 = sliding_window.to_uint8(probs)
  voxel_size = image.voxel_size_nm or tuple(cfg.data.voxel_size_nm)
  sources.write_array(os.path.join(out_dir, "probabilities.zarr"), probs_u8,
                      voxel_size_nm=voxel_size)
  d = cfg.decode
  instances = postprocess.decode_instances(
      probs[..., 0], probs[..., 1], seed_mask=d.seed_mask,
      seed_contour=d.seed_contour, foreground=d.foreground,
      min_seed_size=d.min_seed_size, min_size=d.min_size)
  sources.write_array(os.path.join(out_dir, "instances.zarr"), instances,
                      voxel_size_nm=voxel_size)
  return instances
