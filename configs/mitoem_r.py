"""MitoEM-R (rat), the paper's main benchmark; STT-UNET by default, any
ablation row with an argument: --config=configs/mitoem_r.py:baseline

Settings follow the original Res-UNET-R training (see docs/architecture.md):
patch 32x320x320, batch 2, Adam 1e-4, 200k steps, windows 32x256x256 with 50%
overlap, decoding 0.9/0.8/0.85, GT crumbs under 2,000 voxels ignored by AP.

The volumes must be zarr (v2 or v3) arrays of the MitoEM-R images
(uint8) and instance labels; point the paths at yours, e.g.
  --config.data.train.image=/data/mitoem_r/im_train.zarr
"""

from stt_jax.config import default_config
from stt_jax.presets import apply_preset


def get_config(preset: str = "stt"):
  """preset: a row of the paper's ablation tables (stt_jax/presets.py)."""
  c = default_config()
  c.data.train.image = "data/mitoem_r/im_train.zarr"
  c.data.train.label = "data/mitoem_r/mito_train.zarr"
  c.data.val.image = "data/mitoem_r/im_val.zarr"
  c.data.val.label = "data/mitoem_r/mito_val.zarr"
  c.data.voxel_size_nm = (30.0, 8.0, 8.0)
  c.data.patch_shape = (32, 320, 320)
  c.infer.window = (32, 256, 256)
  c.infer.overlap = 0.5
  c.decode.seed_contour = 0.8
  c.decode.min_size = 128
  c.eval.min_gt_size = 2000
  return apply_preset(c, preset)
