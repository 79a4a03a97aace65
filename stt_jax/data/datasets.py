"""Resolves the config's data section into opened volumes.

With `data.synthetic.enabled`, a training and a held-out volume are generated
once under `<workdir>/data/` and reused by later runs on the same workdir.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

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


def check_image(volume, where: str) -> None:
  """UserError unless `volume` is a 3D uint8 image: the model reads u / 255,
  so 16-bit or float values would be rescaled wrongly, silently."""
  if volume.dtype != np.uint8:
    file, _ = sources.file_and_box(volume)
    raise UserError(f"{where}: image {file} has dtype {volume.dtype}; the model "
                    "reads 8-bit images (0-255): rescale it once with --mode=convert "
                    f"--input={file} --output=<new>.zarr --intensity_range=auto")
  if len(volume.shape) != 3:
    raise UserError(f"{where}: image {volume.path} has shape {tuple(volume.shape)}; "
                    "it must be 3D (z, y, x), one channel")


def open_split(cfg, split: str, *, need_labels: bool = True):
  """Returns (image Volume, label Volume or None) for 'train' or 'val'."""
  image, labels, _ = open_split_with_context(cfg, split, need_labels=need_labels,
                                             context=(0, 0, 0))
  return image, labels


def open_split_with_context(cfg, split: str, *, need_labels: bool = True,
                            context: Sequence[int] | None = None):
  """Returns (image, labels or None, offset): the image grown by `context`
  voxels (z, y, x) on each side of the split's region, cut where the volume
  ends, and the region's start inside that image. Labels cover the region
  only. `context` defaults to data.<split>.context where the split has one.

  Validation windows near a region's faces otherwise see edge-replicated
  padding where the volume holds real tissue: VNC III's validation is 4
  sections thick, so every section of it is within reach of a face in z.
  """
  entry = cfg.data[split]
  region = tuple(entry.get("region", ()) or ())
  image, inner, labels = _open_pair(cfg, entry.image, entry.label if need_labels else None,
                                    region, f"config.data.{split}")
  if context is None:
    context = tuple(entry.get("context", (0, 0, 0)))
  return _grown(image, inner, region, context, labels)


def open_validation_volumes(cfg) -> list[tuple[sources.Volume, sources.Volume, tuple]]:
  """data.val and each of data.val.more_volumes, checked like data.val and
  grown by data.val.context: [(image, labels, offset)] as
  `open_split_with_context` returns them."""
  context = tuple(cfg.data.val.context)
  return [open_split_with_context(cfg, "val")] + [
      _grown(image, inner, region, context, labels)
      for image, inner, labels, region in _open_more(cfg, "val")]


def open_more_volumes(cfg, split: str) -> list[tuple[sources.Volume, sources.Volume]]:
  """data.<split>.more_volumes opened and checked like data.<split>:
  [(image, labels)], each cut to its region when it names one."""
  return [(inner, labels) for _, inner, labels, _ in _open_more(cfg, split)]


def _open_more(cfg, split: str):
  """[(whole image, image cut to its region, labels, region)] of
  data.<split>.more_volumes; errors name `more_volumes[i]`."""
  out = []
  for i, entry in enumerate(cfg.data[split].more_volumes):
    region = tuple(entry[2]) if len(entry) > 2 and entry[2] else ()
    where = f"config.data.{split}.more_volumes[{i}]"
    out.append((*_open_pair(cfg, entry[0], entry[1], region, where), region))
  return out


def _grown(image, inner, region: tuple, context: Sequence[int], labels):
  """(inner grown by `context` on each side of `region` within `image`,
  labels, offset of the region inside it)."""
  if not region or not any(context):
    return inner, labels, (0, 0, 0)
  lo = [max(int(a) - int(c), 0) for a, c in zip(region[0], context)]
  hi = [min(int(b) + int(c), n) for b, c, n in zip(region[1], context, image.shape)]
  offset = tuple(int(a) - low for a, low in zip(region[0], lo))
  return sources.RegionVolume(image, lo, hi), labels, offset


def _open_pair(cfg, image_path: str, label_path: str | None, region: tuple, where: str):
  """(whole image, image cut to `region`, labels cut to it or None), checked:
  paths, uint8 image, integer labels (or a mask, by data.label_kind), region
  inside, equal shapes. Errors start with `where`."""
  volumes = []
  for field, path in (("image", image_path), ("label", label_path)):
    if field == "label" and label_path is None:
      volumes.append(None)
      continue
    if not path:
      raise UserError(f"{where}.{field} is empty; set it to a zarr path "
                      "(or enable data.synthetic)")
    try:
      volumes.append(sources.open_volume(path))
    except UserError as e:
      raise UserError(f"{where}.{field}: {e}") from None
  image, labels = volumes
  check_image(image, f"{where}.image")
  if labels is not None and cfg.data.label_kind == "mask":
    labels = sources.MaskInstancesVolume(labels, cfg.data.mask_threshold)
  elif labels is not None and labels.dtype.kind not in "ui":
    raise UserError(f"{where}.label: {labels.path} has dtype {labels.dtype}; "
                    "instance labels must be integers (a binary mask: "
                    "--config.data.label_kind=mask)")
  unlabelled = int(cfg.data.unlabelled_id)
  if labels is not None and unlabelled >= 0 and unlabelled > np.iinfo(labels.dtype).max:
    raise UserError(f"{where}.label: {labels.path} is {labels.dtype}, which cannot hold "
                    f"data.unlabelled_id={unlabelled}; give the id painted in it")
  inner = image
  if region:
    if len(region) != 2:
      raise UserError(f"{where}.region must be ((z0, y0, x0), (z1, y1, x1)), got {region}")
    try:
      inner = sources.RegionVolume(image, *region)
      labels = sources.RegionVolume(labels, *region) if labels is not None else None
    except UserError as e:
      raise UserError(f"{where}.region: {e}") from None
  if labels is not None and inner.shape != labels.shape:
    raise UserError(f"{where}: image {inner.path} has shape {inner.shape} but "
                    f"labels {labels.path} have shape {labels.shape}; they must match")
  return image, inner, labels
