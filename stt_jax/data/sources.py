"""Volumes on disk in the formats labs use, read region by region.

A `Volume` is a lazy handle: nothing is read until a box is asked for, so a
volume far larger than memory costs only the chunks (or slices) a patch
touches. Arrays are `[depth, height, width]` or `[depth, height, width,
channels]`, whatever the order on disk.

Formats (`open_volume` picks one from the path):
  * zarr v3 and v2, N5, neuroglancer precomputed — through TensorStore; N5 with
    an `axes` attribute and precomputed (x, y, z[, c] on disk) are transposed to
    z, y, x; a precomputed volume's first scale is used (`path#scale=k` picks
    another), its single channel dropped;
  * OME-Zarr images (0.5 on zarr v3, 0.4 on zarr v2): level 0, or `#scale=k`,
    as z, y, x (a time or channel axis of one element dropped), the voxel size
    in nm from the level's scale transform and the axes' units;
  * a multi-page TIFF (`stack.tif`): memory-mapped where the pages are
    uncompressed and contiguous, else one page decoded per slice read;
  * a folder of PNG or TIFF slices (MitoEM's `im0000.png ...`), sorted by the
    numbers in their names, read one slice at a time;
  * HDF5 (`volume.h5:dataset`, the dataset optional when there is only one),
    through h5py, which reads only the chunks a box touches.
We write zarr v3 only (`create_volume`, `convert_to_zarr`): it opens in
neuroglancer and napari and is what `--mode=convert` produces.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from stt_jax import paths
from stt_jax.data import intensity
from stt_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                 thread_name_prefix="stt_jax_read")


class Volume:
  """A chunked array on disk. Reads boxes, never the whole (unless asked)."""

  path: str

  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def dtype(self) -> np.dtype:
    raise NotImplementedError

  @property
  def voxel_size_nm(self) -> tuple[float, float, float] | None:
    return None

  @property
  def translation_nm(self) -> tuple[float, float, float] | None:
    """Where voxel 0 lies in the file's world (z, y, x nm): an OME-Zarr
    level's translation, a precomputed scale's voxel offset times its
    resolution, our zarr outputs' `translation_nm`; None where the file
    says nothing (the origin)."""
    return None

  def _check_box(self, start: Sequence[int], size: Sequence[int]) -> list[slice]:
    stop = [int(s) + int(n) for s, n in zip(start, size)]
    for axis, (lo, hi, dim) in enumerate(zip(start, stop, self.shape)):
      if lo < 0 or hi > dim or hi < lo:
        raise ValueError(f"region {[int(s) for s in start]}+{[int(n) for n in size]} "
                         f"leaves {self.path} (shape {self.shape}) on axis {axis}")
    return [slice(int(lo), hi) for lo, hi in zip(start, stop)]

  def _read_box(self, box: list[slice]) -> np.ndarray:
    raise NotImplementedError

  def read_async(self, start: Sequence[int], size: Sequence[int]):
    """Starts reading the box [start, start+size); `.result()` is a numpy array."""
    box = self._check_box(start, size)
    return _READERS.submit(self._read_box, box)

  def read(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    return self.read_async(start, size).result()

  def read_here(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """`read` without the shared reader pool (safe from inside a pool thread)."""
    return self._read_box(self._check_box(start, size))

  def write(self, start: Sequence[int], array: np.ndarray) -> None:
    raise UserError(f"{self.path} is read-only ({type(self).__name__}); "
                    "write zarr (--mode=convert makes one)")


class TensorStoreVolume(Volume):
  """zarr v2/v3, N5, neuroglancer precomputed."""

  def __init__(self, store: ts.TensorStore, path: str,
               voxel_size_nm: Sequence[float] | None = None,
               translation_nm: Sequence[float] | None = None):
    self._store = store[ts.d[:].translate_to[0]]  # precomputed may start elsewhere
    self.path = path
    self._voxel_size = tuple(float(v) for v in voxel_size_nm) if voxel_size_nm else None
    self._translation = (tuple(float(v) for v in translation_nm)
                         if translation_nm is not None else None)

  @property
  def store(self) -> ts.TensorStore:
    """The TensorStore behind, its origin at 0."""
    return self._store

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self._store.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self._store.dtype.numpy_dtype)

  @property
  def voxel_size_nm(self):
    if self._voxel_size:
      return self._voxel_size
    size = zarr_attributes(self.path).get("voxel_size_nm")
    return tuple(float(v) for v in size) if size else None

  @property
  def translation_nm(self):
    if self._translation is not None:
      return self._translation
    offset = zarr_attributes(self.path).get("translation_nm")
    return tuple(float(v) for v in offset) if offset else None

  def read_async(self, start: Sequence[int], size: Sequence[int]) -> ts.Future:
    return self._store[tuple(self._check_box(start, size))].read()

  def read_here(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    return self.read(start, size)  # TensorStore's own threads, not the pool

  def write(self, start: Sequence[int], array: np.ndarray) -> None:
    self._store[tuple(self._check_box(start, array.shape))].write(array).result()


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_image_file(path: str) -> np.ndarray:
  """One slice; a 1-bit (black/white) image reads as uint8 0/255, as 8-bit
  tools show it: mask folders mix the two (VNC III sections 1 and 7 are 1-bit
  PNGs among 8-bit ones; read as 0/1 they fell under any 8-bit threshold)."""
  if path.lower().endswith(IMAGE_SUFFIXES[1:]):
    import tifffile  # pylint: disable=g-import-not-at-top
    image = tifffile.imread(path)
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as opened:
      image = np.asarray(opened)
  return image.astype(np.uint8) * 255 if image.dtype == bool else image


class SliceFolderVolume(Volume):
  """A folder of 2D PNG/TIFF slices, one per z, sorted by their numbers."""

  def __init__(self, path: str, files: list[str]):
    self.path = path
    self._files = files
    first = _read_image_file(files[0])
    self._slice_shape, self._dtype = first.shape, first.dtype

  @property
  def shape(self):
    return (len(self._files), *self._slice_shape)

  @property
  def dtype(self):
    return np.dtype(self._dtype)

  def _read_box(self, box):
    out = np.empty([s.stop - s.start for s in box], self._dtype)
    for i, z in enumerate(range(box[0].start, box[0].stop)):
      image = _read_image_file(self._files[z])
      if image.shape != self._slice_shape:
        raise UserError(f"{self._files[z]} has shape {image.shape}, the first slice "
                        f"{self._files[0]} {self._slice_shape}; all slices must match")
      if image.dtype != self._dtype:  # a cast would wrap or truncate values
        raise UserError(f"{self._files[z]} holds {image.dtype}, the first slice "
                        f"{self._files[0]} {np.dtype(self._dtype)}; convert the slices "
                        "to one type")
      out[i] = image[tuple(box[1:])]
    return out


class TiffStackVolume(Volume):
  """A multi-page TIFF, one page per z."""

  def __init__(self, path: str):
    import tifffile  # pylint: disable=g-import-not-at-top
    self.path = path
    try:
      self._memmap = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or scattered pages: decode page by page
      self._memmap = None
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      self._shape, self._dtype = tuple(series.shape), series.dtype
    if self._memmap is not None and self._memmap.ndim == 2:
      self._memmap = self._memmap[None]
      self._shape = self._memmap.shape
    if len(self._shape) == 2:
      self._shape = (1, *self._shape)

  @property
  def shape(self):
    return tuple(int(s) for s in self._shape)

  @property
  def dtype(self):
    return np.dtype(self._dtype)

  def _read_box(self, box):
    if self._memmap is not None:
      return np.array(self._memmap[tuple(box)])
    import tifffile  # pylint: disable=g-import-not-at-top
    out = np.empty([s.stop - s.start for s in box], self._dtype)
    with tifffile.TiffFile(self.path) as tif:
      for i, z in enumerate(range(box[0].start, box[0].stop)):
        out[i] = tif.pages[z].asarray()[tuple(box[1:])]
    return out


class HDF5Volume(Volume):
  """One dataset of an HDF5 file, through h5py."""

  def __init__(self, path: str, dataset: str):
    import h5py  # pylint: disable=g-import-not-at-top
    self.path = f"{path}:{dataset}"
    self._file = h5py.File(path, "r")
    self._dataset = self._file[dataset]
    resolution = self._dataset.attrs.get("resolution")
    self._voxel_size = (tuple(float(v) for v in resolution)
                        if resolution is not None and len(resolution) == 3 else None)

  @property
  def shape(self):
    return tuple(int(s) for s in self._dataset.shape)

  @property
  def dtype(self):
    return np.dtype(self._dataset.dtype)

  @property
  def voxel_size_nm(self):
    return self._voxel_size

  def _read_box(self, box):
    return self._dataset[tuple(box)]


class NiftiVolume(Volume):
  """A NIfTI-1/2 file (.nii, .nii.gz) through nibabel; its (x, y, z) axes
  read as our [z, y, x]. A .nii is memory-mapped; gzip cannot seek, so a
  .nii.gz is decompressed into memory on the first read (convert large ones
  with --mode=convert)."""

  def __init__(self, path: str):
    import nibabel  # pylint: disable=g-import-not-at-top
    self.path = path
    self._image = nibabel.load(path)
    self._array = None
    header = self._image.header
    if len(self._image.shape) != 3:
      raise UserError(f"{path}: NIfTI volume must be 3D, got shape {self._image.shape}")
    scale = {"meter": 1e9, "mm": 1e6, "micron": 1e3}.get(header.get_xyzt_units()[0])
    zooms = ([round(float(z) * scale, 3) for z in header.get_zooms()[:3]] if scale
             else None)  # zooms are float32: 0.03 um reads 29.999999 nm
    # many EM NIfTIs carry a placeholder 1 mm: keep only plausible EM sizes
    self._voxel_size = (tuple(zooms[::-1]) if zooms and all(0.1 <= z <= 1e4 for z in zooms)
                        else None)

  @property
  def shape(self):
    return tuple(int(s) for s in self._image.shape[::-1])

  @property
  def dtype(self):
    return np.dtype(self._image.get_data_dtype())

  @property
  def voxel_size_nm(self):
    return self._voxel_size

  def _read_box(self, box):
    if self._array is None:
      proxy = self._image.dataobj
      self._array = (np.asarray(proxy) if self.path.lower().endswith(".gz") else proxy)
    z, y, x = box
    return np.ascontiguousarray(np.asarray(self._array[x, y, z], self.dtype).transpose(2, 1, 0))


class MaskInstancesVolume(Volume):
  """Instance ids made from a binary mask volume (e.g. VNC III's 0/255 PNGs
  with anti-aliased edges): voxels >= `threshold` are foreground and each 3D
  6-connected component is one instance. Computed once, over the whole
  volume, on the first read (so ids are global); hence bounded in size."""

  MAX_VOXELS = 1 << 28  # 1 GiB of uint32 ids

  def __init__(self, base: Volume, threshold: float):
    voxels = int(np.prod(base.shape))
    if voxels > self.MAX_VOXELS:
      raise UserError(f"{base.path}: {base.shape} is too large to label as a mask in "
                      f"memory ({voxels} > {self.MAX_VOXELS} voxels); label its connected "
                      "components once into a zarr and use data.label_kind='instances'")
    self._base, self._threshold = base, threshold
    self.path = base.path
    self._labels = None
    self._lock = threading.Lock()

  @property
  def shape(self):
    return self._base.shape

  @property
  def dtype(self):
    return np.dtype(np.uint32)

  @property
  def voxel_size_nm(self):
    return self._base.voxel_size_nm

  @property
  def translation_nm(self):
    return self._base.translation_nm

  def _read_box(self, box):
    with self._lock:
      if self._labels is None:
        import cc3d  # pylint: disable=g-import-not-at-top
        # not through the shared reader pool: waiting on it while its
        # threads wait on this lock would deadlock
        mask = self._base.read_here([0] * len(self.shape), self.shape) >= self._threshold
        self._labels = cc3d.connected_components(mask, connectivity=6).astype(np.uint32)
    return self._labels[tuple(box)].copy()


class RegionVolume(Volume):
  """The box [start, stop) of another volume, as a volume of its own."""

  def __init__(self, base: Volume, start: Sequence[int], stop: Sequence[int]):
    shape = base.shape
    start, stop = [int(s) for s in start], [int(s) for s in stop]
    if (len(start) != 3 or len(stop) != 3 or any(lo < 0 or hi > n or hi <= lo for lo, hi, n
                                                   in zip(start, stop, shape))):
      raise UserError(f"region {start}..{stop} is not inside {base.path} "
                      f"(shape {list(shape[:3])}); give (z, y, x) start and stop")
    self.base, self.start, self.stop = base, start, stop
    self.path = f"{base.path}[{start}:{stop}]"

  @property
  def shape(self):
    return (*[hi - lo for lo, hi in zip(self.start, self.stop)], *self.base.shape[3:])

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def voxel_size_nm(self):
    return self.base.voxel_size_nm

  @property
  def translation_nm(self):
    size = self.voxel_size_nm  # without one, callers pass theirs to world_translation_nm
    return world_translation_nm(self, size) if size is not None else None

  def _in_base(self, start, size) -> list[int]:
    """`start` of a box of this region, checked, in the base's coordinates."""
    self._check_box(start, size)
    return [s + o for s, o in zip(start, self.start)] + list(start[3:])

  def read_async(self, start, size):
    return self.base.read_async(self._in_base(start, size), size)

  def read_here(self, start, size):
    return self.base.read_here(self._in_base(start, size), size)


def world_translation_nm(volume: Volume, voxel_size_nm: Sequence[float]
                         ) -> tuple[float, float, float]:
  """`volume.translation_nm` (zeros where the file says nothing), plus a
  `RegionVolume`'s start times `voxel_size_nm` (the volume's own, or the
  configured one where it has none): where an output made of `volume`
  lies, so that viewers overlay it on its source."""
  if isinstance(volume, RegionVolume):
    base = world_translation_nm(volume.base, voxel_size_nm)
    return tuple(float(t + s * v) for t, s, v in zip(base, volume.start, voxel_size_nm))
  offset = volume.translation_nm
  return tuple(float(v) for v in offset) if offset is not None else (0.0, 0.0, 0.0)


def file_and_box(volume: Volume) -> tuple[str, list | None]:
  """(the absolute path of the file behind `volume`, [start, stop] when it is
  a `RegionVolume` box of it, else None)."""
  if isinstance(volume, RegionVolume):
    return os.path.abspath(volume.base.path), [volume.start, volume.stop]
  return os.path.abspath(volume.path), None


def zarr_attributes(path: str) -> dict:
  meta = os.path.join(path, "zarr.json")
  if os.path.exists(meta):
    with open(meta) as f:
      return json.load(f).get("attributes", {})
  attrs = os.path.join(path, ".zattrs")
  if os.path.exists(attrs):
    with open(attrs) as f:
      return json.load(f)
  return {}


def _open_tensorstore(spec: dict, path: str) -> ts.TensorStore:
  try:
    return ts.open(spec, open=True, read=True).result()
  except ValueError as e:
    raise UserError(f"cannot open {path} as {spec['driver']}: "
                    f"{str(e).splitlines()[0]}") from None


def _open_n5(path: str) -> TensorStoreVolume:
  store = _open_tensorstore({"driver": "n5", "kvstore": {"driver": "file", "path": path}},
                            path)
  with open(os.path.join(path, "attributes.json")) as f:
    attrs = json.load(f)
  axes = [str(a).lower() for a in attrs.get("axes", [])]
  voxel = attrs.get("resolution") or attrs.get("pixelResolution", {}).get("dimensions")
  if sorted(axes[:3]) == ["x", "y", "z"] or sorted(axes) == ["x", "y", "z"]:
    order = [axes.index(a) for a in ("z", "y", "x")] + [
        i for i, a in enumerate(axes) if a not in ("x", "y", "z")]
    store = store[ts.d[order].transpose[:]]
    if voxel and len(voxel) == len(axes):
      voxel = [voxel[i] for i in order[:3]]
  return TensorStoreVolume(store, path, voxel if voxel and len(voxel) == 3 else None)


def _open_precomputed(path: str, scale: int) -> TensorStoreVolume:
  spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": path},
          "scale_index": scale}
  store = _open_tensorstore(spec, path)
  with open(os.path.join(path, "info")) as f:
    scale_info = json.load(f)["scales"][scale]
  resolution = scale_info["resolution"]  # x, y, z
  offset = scale_info.get("voxel_offset", [0, 0, 0])
  if store.shape[-1] == 1:
    store = store[..., 0]
    store = store[ts.d[2, 1, 0].transpose[:]]
  else:
    store = store[ts.d[2, 1, 0, 3].transpose[:]]
  return TensorStoreVolume(store, path, resolution[::-1],
                           [float(o * r) for o, r in zip(offset[::-1], resolution[::-1])])


# OME-Zarr axis units (the spec's UDUNITS-2 names) in nm
_NM_PER_UNIT = {"angstrom": 0.1, "picometer": 1e-3, "nanometer": 1.0, "micrometer": 1e3,
                "millimeter": 1e6, "centimeter": 1e7, "meter": 1e9}


def _ome_multiscale(path: str) -> tuple[dict, str] | None:
  """(the first `multiscales` entry, "zarr3" or "zarr") of an OME-Zarr image
  group at `path` (0.5: zarr v3, under attributes.ome; 0.4: zarr v2
  .zattrs), or None when `path` is no such group."""
  meta = os.path.join(path, "zarr.json")
  if os.path.exists(meta):
    with open(meta) as f:
      node = json.load(f)
    scales = node.get("attributes", {}).get("ome", {}).get("multiscales")
    if node.get("node_type") == "group" and scales:
      return scales[0], "zarr3"
    return None
  attrs = os.path.join(path, ".zattrs")
  if os.path.exists(attrs) and not os.path.exists(os.path.join(path, ".zarray")):
    with open(attrs) as f:
      scales = json.load(f).get("multiscales")
    return (scales[0], "zarr") if scales else None
  return None


def _open_ome_zarr(path: str, multiscale: dict, driver: str, scale: int) -> TensorStoreVolume:
  """Level `scale` of an OME-Zarr image as a z, y, x volume: other axes
  (time, channel) must have one element; the voxel size in nm comes from
  the level's scale transform (times the multiscale's own) and the units."""
  datasets = multiscale.get("datasets", [])
  if not 0 <= scale < len(datasets):
    raise UserError(f"{path} is an OME-Zarr image with {len(datasets)} levels; "
                    f"#scale={scale} is not one of them")
  axes = [a if isinstance(a, dict) else {"name": a} for a in multiscale.get("axes", [])]
  names = [str(a.get("name", "")).lower() for a in axes]
  if not {"z", "y", "x"} <= set(names):
    raise UserError(f"{path}: OME-Zarr axes {names} lack z, y and x; stt_jax reads 3D "
                    "volumes")
  store = _open_tensorstore({"driver": driver, "kvstore": {
      "driver": "file", "path": os.path.join(path, datasets[scale]["path"])}}, path)
  if store.rank != len(names):
    raise UserError(f"{path}: level {scale} has {store.rank} dimensions but "
                    f"{len(names)} OME-Zarr axes")
  for name, n in zip(names, store.shape):
    if name not in ("z", "y", "x") and n != 1:
      raise UserError(f"{path}: OME-Zarr axis {name!r} has {n} elements; stt_jax reads one "
                      "channel and one time point (convert that one first)")
  store = store[tuple(slice(None) if n in ("z", "y", "x") else 0 for n in names)]
  kept = [n for n in names if n in ("z", "y", "x")]
  store = store[ts.d[[kept.index(a) for a in ("z", "y", "x")]].transpose[:]]
  # index -> factor * index + shift: the level's transforms, then the
  # multiscale's (the spec's order)
  factor, shift = np.ones(len(names)), np.zeros(len(names))
  for transforms in (datasets[scale].get("coordinateTransformations", []),
                     multiscale.get("coordinateTransformations", [])):
    for t in transforms:
      if t.get("type") == "scale" and "scale" in t:
        factor, shift = factor * np.asarray(t["scale"], float), shift * np.asarray(
            t["scale"], float)
      elif t.get("type") == "translation" and "translation" in t:
        shift = shift + np.asarray(t["translation"], float)
  units = [a.get("unit") for a in axes]
  voxel = translation = None
  if all(units[names.index(a)] in _NM_PER_UNIT for a in ("z", "y", "x")):
    nm = [_NM_PER_UNIT[units[names.index(a)]] for a in ("z", "y", "x")]
    voxel = [float(factor[names.index(a)] * u) for a, u in zip("zyx", nm)]
    translation = [float(shift[names.index(a)] * u) for a, u in zip("zyx", nm)]
  return TensorStoreVolume(store, path, voxel, translation)


def open_volume(path: str) -> Volume:
  """Opens an existing volume in any supported format; a one-line UserError
  naming the path otherwise."""
  scale = 0
  if "#scale=" in path:
    path, _, text = path.partition("#scale=")
    scale = int(text)
  dataset = None
  lower = path.lower()
  for suffix in HDF5_SUFFIXES:
    if f"{suffix}:" in lower:
      cut = lower.index(f"{suffix}:") + len(suffix)
      path, dataset = path[:cut], path[cut + 1:]
      lower = path.lower()
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"volume not found: {path}")
  if os.path.isdir(path):
    multiscale = _ome_multiscale(path)
    if multiscale is not None:
      return _open_ome_zarr(path, *multiscale, scale)
    if os.path.exists(os.path.join(path, "zarr.json")):
      store = _open_tensorstore({"driver": "zarr3",
                                 "kvstore": {"driver": "file", "path": path}}, path)
      return TensorStoreVolume(store, path)
    if os.path.exists(os.path.join(path, ".zarray")):
      store = _open_tensorstore({"driver": "zarr", "kvstore": {"driver": "file", "path": path}},
                                path)
      return TensorStoreVolume(store, path)
    if os.path.exists(os.path.join(path, "attributes.json")):
      return _open_n5(path)
    if os.path.exists(os.path.join(path, "info")):
      return _open_precomputed(path, scale)
    files = sorted((os.path.join(path, n) for n in os.listdir(path)
                    if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")),
                   key=lambda p: _natural_key(os.path.basename(p)))
    if files:
      return SliceFolderVolume(path, files)
    raise UserError(f"{path} is not a volume: no zarr.json, .zarray, attributes.json "
                    "(N5), info (precomputed) or PNG/TIFF slices inside")
  if lower.endswith(IMAGE_SUFFIXES[1:]):
    return TiffStackVolume(path)
  if lower.endswith(IMAGE_SUFFIXES):
    raise UserError(f"{path} is one 2D image; a volume of PNG sections is the folder "
                    "holding them (named in order), so pass that folder")
  if lower.endswith(NIFTI_SUFFIXES):
    return NiftiVolume(path)
  if lower.endswith(HDF5_SUFFIXES):
    import h5py  # pylint: disable=g-import-not-at-top
    with h5py.File(path, "r") as f:
      names = []
      f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if dataset is None:
      if len(names) != 1:
        raise UserError(f"{path} holds {len(names)} datasets ({', '.join(names[:8])}); "
                        f"name one as {path}:<dataset>")
      dataset = names[0]
    if dataset.strip("/") not in names:
      raise UserError(f"{path} has no dataset {dataset!r}; it holds {', '.join(names[:8])}")
    return HDF5Volume(path, dataset.strip("/"))
  raise UserError(f"{path}: unknown volume format; use zarr, N5, neuroglancer "
                  "precomputed, a TIFF stack, a folder of PNG/TIFF slices, HDF5 or NIfTI")


def create_volume(path: str, shape: Sequence[int], dtype, *,
                  chunks: Sequence[int] | None = None,
                  voxel_size_nm: Sequence[float] | None = None,
                  translation_nm: Sequence[float] | None = None,
                  attributes: dict | None = None,
                  overwrite: bool = False) -> TensorStoreVolume:
  """Creates a zarr v3 array. Refuses to replace an existing path unless
  asked. `translation_nm` (z, y, x: where voxel 0 lies) is kept as an
  attribute where it is not the origin; `attributes` are kept beside."""
  path = paths.clear_for_output(path, overwrite)
  shape = [int(s) for s in shape]
  if chunks is None:
    chunks = [min(s, c) for s, c in zip(shape, (16, 128, 128, 4, 4))]
  names = ["z", "y", "x", "c"][:len(shape)]
  attributes = dict(attributes or {})
  if voxel_size_nm is not None:
    attributes["voxel_size_nm"] = [float(v) for v in voxel_size_nm]
  if translation_nm is not None and any(float(v) != 0 for v in translation_nm):
    attributes["translation_nm"] = [float(v) for v in translation_nm]
  spec = {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": path},
      "metadata": {
          "shape": shape,
          "data_type": np.dtype(dtype).name,
          "chunk_grid": {"name": "regular",
                         "configuration": {"chunk_shape": [int(c) for c in chunks]}},
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                     {"name": "zstd", "configuration": {"level": 3}}],
          "dimension_names": names,
          "attributes": attributes,
      },
  }
  store = ts.open(spec, create=True).result()
  return TensorStoreVolume(store, path)


def reopen_for_writing(path: str) -> TensorStoreVolume:
  """An existing zarr v3 volume of ours, writable (to finish an interrupted
  run)."""
  path = os.path.abspath(path)
  try:
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}},
                    open=True, read=True, write=True).result()
  except ValueError as e:
    raise UserError(f"cannot reopen {path} to continue writing it: "
                    f"{str(e).splitlines()[0]}; pass --overwrite to start again") from None
  return TensorStoreVolume(store, path)


def write_array(path: str, array: np.ndarray, *,
                voxel_size_nm: Sequence[float] | None = None,
                overwrite: bool = False) -> TensorStoreVolume:
  """Writes an in-memory array as a new zarr v3 volume."""
  volume = create_volume(path, array.shape, array.dtype,
                         voxel_size_nm=voxel_size_nm, overwrite=overwrite)
  volume.write([0] * array.ndim, array)
  return volume


def convert_to_zarr(source: Volume, path: str, *, chunks: Sequence[int] | None = None,
                    voxel_size_nm: Sequence[float] | None = None,
                    overwrite: bool = False, slab_depth: int | None = None,
                    intensity_range: tuple[float, float] | None = None) -> TensorStoreVolume:
  """Copies `source` into a new chunked zarr v3 volume, one slab of z at a
  time (memory: one slab), so any readable volume becomes a fast one. With
  `intensity_range` (low, high) the values are rescaled to uint8 on the way
  (`intensity.to_uint8`, one section at a time). The copy keeps where
  `source` lies (`world_translation_nm`)."""
  voxel_size_nm = voxel_size_nm or source.voxel_size_nm
  out = create_volume(path, source.shape,
                      np.uint8 if intensity_range else source.dtype, chunks=chunks,
                      voxel_size_nm=voxel_size_nm,
                      translation_nm=(world_translation_nm(source, voxel_size_nm)
                                      if voxel_size_nm else source.translation_nm),
                      overwrite=overwrite)
  depth = slab_depth or min(source.shape[0], 16 if chunks is None else int(chunks[0]))
  for z in range(0, source.shape[0], depth):
    size = [min(depth, source.shape[0] - z), *source.shape[1:]]
    slab = source.read([z] + [0] * (len(size) - 1), size)
    if intensity_range:
      slab = np.stack([intensity.to_uint8(section, *intensity_range) for section in slab])
    out.write([z] + [0] * (len(size) - 1), slab)
  return out
