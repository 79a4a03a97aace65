"""MitoEM-H (human). As MitoEM-R, but the original decodes the human volume
with a stricter contour threshold (seeds: contour < 0.75)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling configs
import mitoem_r  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(preset: str = "stt"):
  c = mitoem_r.get_config(preset)
  c.data.train.image = "data/mitoem_h/im_train.zarr"
  c.data.train.label = "data/mitoem_h/mito_train.zarr"
  c.data.val.image = "data/mitoem_h/im_val.zarr"
  c.data.val.label = "data/mitoem_h/mito_val.zarr"
  c.decode.seed_contour = 0.75
  return c
