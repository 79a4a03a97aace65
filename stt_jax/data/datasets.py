"""Resolves the config's data section into opened volumes.

With `data.synthetic.enabled`, a training and a held-out volume are generated
once under `<workdir>/data/` and reused by later runs on the same workdir.
"""

from __future__ import annotations

import os

from stt_jax.data import sources, synthetic
from stt_jax.errors import UserError


def ensure_synthetic(cfg, workdir: str) -> None:
  """Generates the synthetic volumes if needed and points the config at them."""
  syn = cfg.data.synthetic
  for split, seed, shape in (("train", syn.train_seed, syn.train_shape),
                             ("val", syn.val_seed, syn.val_shape)):
    directory = os.path.join(os.path.abspath(workdir), "data", split)
    if not os.path.exists(os.path.join(directory, "labels.zarr")):
      spec = synthetic.SyntheticSpec(shape=tuple(shape), anisotropy=syn.anisotropy)
      synthetic.write_volume_pair(directory, spec, seed,
                                  voxel_size_nm=tuple(cfg.data.voxel_size_nm))
    with cfg.unlocked():
      cfg.data[split].image = os.path.join(directory, "image.zarr")
      cfg.data[split].label = os.path.join(directory, "labels.zarr")


def open_split(cfg, split: str, *, need_labels: bool = True):
  """Returns (image Volume, label Volume or None) for 'train' or 'val'."""
  entry = cfg.data[split]
  volumes = []
  for field in ("image", "label"):
    path = entry[field]
    if field == "label" and not need_labels:
      volumes.append(None)
      continue
    if not path:
      raise UserError(f"config.data.{split}.{field} is empty; set it to a zarr path "
                      "(or enable data.synthetic)")
    try:
      volumes.append(sources.open_volume(path))
    except UserError as e:
      raise UserError(f"config.data.{split}.{field}: {e}") from None
  image, labels = volumes
  if labels is not None and cfg.data.label_kind == "mask":
    labels = sources.MaskInstancesVolume(labels, cfg.data.mask_threshold)
  region = tuple(entry.get("region", ()) or ())
  if region:
    if len(region) != 2:
      raise UserError(f"config.data.{split}.region must be ((z0, y0, x0), (z1, y1, x1)), "
                      f"got {region}")
    try:
      image = sources.RegionVolume(image, *region)
      labels = sources.RegionVolume(labels, *region) if labels is not None else None
    except UserError as e:
      raise UserError(f"config.data.{split}.region: {e}") from None
  if labels is not None and image.shape != labels.shape:
    raise UserError(f"data.{split}: image {image.path} has shape {image.shape} but "
                    f"labels {labels.path} have shape {labels.shape}; they must match")
  return image, labels
