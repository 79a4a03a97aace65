"""Lucchi (EPFL hippocampus, FIB-SEM, ~5 nm isotropic): semantic mitochondria
masks scored by foreground Jaccard and Dice on the test volume.

Isotropic voxels, so the first two stages also down-sample z. Convert the
TIFF stacks to zarr and point the paths at them.
"""

from stt_jax.config import default_config
from stt_jax.presets import apply_preset


def get_config(preset: str = "stt"):
  """preset: a row of the paper's ablation tables (stt_jax/presets.py)."""
  c = default_config()
  c.data.train.image = "data/lucchi/train_im.zarr"
  c.data.train.label = "data/lucchi/train_label.zarr"
  c.data.val.image = "data/lucchi/test_im.zarr"
  c.data.val.label = "data/lucchi/test_label.zarr"
  c.data.voxel_size_nm = (5.0, 5.0, 5.0)
  c.model.downsample_z = (True, True, False, False)
  c.data.patch_shape = (32, 256, 256)
  c.infer.window = (32, 256, 256)
  c.train.steps = 100_000
  c.eval.min_gt_size = 0
  return apply_preset(c, preset)
