"""Multiscale copies for viewing: neuroglancer precomputed or OME-Zarr 0.5.

A whole MitoEM volume (1000 x 4096 x 4096) is 16 G voxels; a viewer zoomed out
over a single-scale array reads all of it. Neuroglancer's precomputed format
holds a pyramid of scales that any static file server can serve (neuroglancer
then opens `precomputed://https://<server>/<folder>`), and CloudVolume and
webKnossos read it too.

* Label volumes (any integer dtype but uint8; negative ids refused) become a
  `segmentation` of uint32/uint64 ids, compressed_segmentation encoded; each
  coarser scale takes the most frequent id of each 2 x 2 (x 2) box, ties to
  the smaller id, so instances keep their ids at every scale.
* uint8 images become an `image`, raw encoded, each scale the mean (rounded
  half to even).
* Scales halve y and x, and z too where that keeps voxels closer to cubic
  (z size < sqrt(2) x the y/x size): MitoEM's 30 x 8 x 8 nm goes 30x16x16,
  30x32x32, 60x64x64 ... Scales stop once y and x fit in 256 voxels.

An output path ending in `.ome.zarr` gets the same levels as an OME-Zarr 0.5
image (zarr v3 arrays `0`, `1`, ... under a group whose `ome` attributes give
each level's scale and translation; labels marked `image-label`), which napari
opens through napari-ome-zarr.

With `mesh_scale` a labels pyramid also gets surface meshes of every id
(`mesh/`, from that scale: see `meshes`) for neuroglancer's 3D view and
`segment_properties/` (every id with its volume) for its segment list.

Scale 0 is copied from any readable volume one block of chunks at a time;
scale k is computed from scale k-1 through TensorStore's `downsample` view,
so memory stays at one block whatever the volume's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from stt_jax import paths
from stt_jax.data import meshes, sources
from stt_jax.data.sources import Volume
from stt_jax.errors import UserError
from stt_jax.infer import blocks

COARSEST_IN_PLANE = 256
BLOCK_CHUNKS = (2, 8, 8)  # chunks (z, y, x) per copied block


def scale_factors(shape: Sequence[int], voxel_size_nm: Sequence[float],
                  max_scales: int | None = None) -> list[tuple[int, int, int]]:
  """(z, y, x) factors from each scale to the next, until y and x fit in
  COARSEST_IN_PLANE voxels (or `max_scales` scales in all)."""
  size = [float(s) for s in voxel_size_nm]
  extent = [int(s) for s in shape]
  factors = []
  while max(extent[1:]) > COARSEST_IN_PLANE and (max_scales is None
                                                 or len(factors) + 1 < max_scales):
    fz = 2 if extent[0] > 1 and size[0] < math.sqrt(2) * size[1] else 1
    factors.append((fz, 2, 2))
    size = [size[0] * fz, size[1] * 2, size[2] * 2]
    extent = [math.ceil(extent[0] / fz), math.ceil(extent[1] / 2), math.ceil(extent[2] / 2)]
  return factors


def _chunk_zyx(voxel_size_nm: Sequence[float], shape: Sequence[int]) -> list[int]:
  """Chunks near-cubic in nm: thin sections get 16 deep and 128 wide."""
  chunk = [16, 128, 128] if voxel_size_nm[0] >= 2 * voxel_size_nm[1] else [64, 64, 64]
  return [min(c, int(n)) for c, n in zip(chunk, shape)]


def is_ome_zarr(path: str) -> bool:
  return path.rstrip("/").lower().endswith(".ome.zarr")


def _create_scale(path: str, kind: str, dtype: str, shape_zyx, size_nm, origin_zyx,
                  level: int = 0):
  """A new scale of the pyramid at `path` (precomputed: the first one writes
  `info`; OME-Zarr: the array `<path>/<level>`), as an [x, y, z, 1] view
  whose domain starts at `origin_zyx` (whole voxels of this scale)."""
  chunk = _chunk_zyx(size_nm, shape_zyx)
  origin = [int(o) for o in origin_zyx[::-1]]
  if is_ome_zarr(path):
    array = sources.create_volume(os.path.join(path, str(level)), shape_zyx, dtype,
                                  chunks=chunk)
    view = array.store[ts.d[2, 1, 0].transpose[:]][..., ts.newaxis]
    return view[ts.d[:].translate_to[origin + [0]]], chunk
  scale = {"size": [int(n) for n in shape_zyx[::-1]],
           "resolution": [float(s) for s in size_nm[::-1]],
           "chunk_size": chunk[::-1], "voxel_offset": origin,
           "encoding": "compressed_segmentation" if kind == "segmentation" else "raw"}
  if kind == "segmentation":
    scale["compressed_segmentation_block_size"] = [8, 8, 8]
  spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": path},
          "multiscale_metadata": {"type": kind, "data_type": dtype, "num_channels": 1},
          "scale_metadata": scale}
  return ts.open(spec, create=True).result(), chunk


def write_pyramid(source: Volume, path: str, *, voxel_size_nm: Sequence[float],
                  translation_nm: Sequence[float] | None = None,
                  max_scales: int | None = None, overwrite: bool = False,
                  block_chunks: Sequence[int] = BLOCK_CHUNKS,
                  mesh_scale: int | None = None,
                  mesh_cubes: Sequence[int] = meshes.CUBES_PER_BLOCK) -> dict:
  """Writes `source` ([z, y, x], one channel) as a neuroglancer precomputed
  pyramid at `path`, or an OME-Zarr 0.5 one where `path` ends in .ome.zarr
  (an existing one refused unless `overwrite`). Returns {"type",
  "data_type", "scales": [{"shape_zyx", "voxel_size_nm", "origin_zyx"}],
  "translation_nm"}, plus "format" for OME-Zarr.

  The pyramid lies where `source` does (`translation_nm`, by default
  `sources.world_translation_nm`), so it overlays the volume it came from.
  Scale 0 starts at that translation in whole voxels (`origin_zyx`; a
  precomputed `voxel_offset`); each coarser scale is the downsampling of
  boxes aligned on the world grid (TensorStore downsamples from index 0), so
  its origin is whole voxels too. OME-Zarr keeps the sub-voxel rest of the
  translation; precomputed, which holds whole voxels only, drops it (the
  returned "translation_nm" is what was written).

  `mesh_scale` (labels only): surface meshes of every id from that scale
  (the coarsest where the pyramid has fewer), and their volumes as segment
  properties (`meshes`); the result then holds "meshes": {"scale",
  "objects", "fragments", "triangles", "without_mesh"}."""
  if len(source.shape) != 3:
    raise UserError(f"{source.path} has shape {tuple(source.shape)}; a pyramid is made "
                    "of a 3D volume (z, y, x)")
  dtype = np.dtype(source.dtype)
  if dtype == np.uint8:
    kind, stored, method = "image", "uint8", "mean"
  elif dtype.kind in "ui":
    if dtype.kind == "i" or dtype.itemsize == 8:
      stored = "uint64"
    else:
      stored = "uint32"
    kind, method = "segmentation", "mode"
  else:
    raise UserError(f"{source.path} is {dtype}: a pyramid is made of uint8 images or "
                    "integer labels (rescale a float image with --mode=convert "
                    "--intensity_range=auto first)")
  if mesh_scale is not None and kind != "segmentation":
    raise UserError(f"{source.path} is a uint8 image: meshes are made of instance labels")
  if mesh_scale is not None and is_ome_zarr(path):
    raise UserError(f"{path}: meshes go into neuroglancer precomputed pyramids; name the "
                    "output without .ome.zarr, or leave out --mesh_scale")
  path = paths.clear_for_output(path, overwrite)
  shape = [int(n) for n in source.shape]
  size = [float(s) for s in voxel_size_nm]
  if translation_nm is None:
    translation_nm = sources.world_translation_nm(source, size)
  origin = [int(v) for v in np.rint(np.asarray(translation_nm, float) / size)]
  rest = np.asarray(translation_nm, float) - np.asarray(origin) * size
  store, chunk = _create_scale(path, kind, stored, shape, size, origin)
  voxels: dict[int, int] = {}
  for b in blocks.iterate(shape, [c * k for c, k in zip(chunk, block_chunks)]):
    block = np.asarray(source.read(b.start, b.shape))
    if dtype.kind == "i" and block.size and block.min() < 0:
      shutil.rmtree(path)  # this call's own partial output
      raise UserError(f"{source.path} holds negative ids ({int(block.min())} in the block at "
                      f"{list(b.start)}); viewers' label ids are unsigned, so map them to 0 "
                      f"(background) or positive ids first; nothing was left at {path}")
    block = block.astype(stored, copy=False)
    box = tuple(slice(a + o, z + o) for a, z, o in zip(b.start[::-1], b.stop[::-1],
                                                        origin[::-1]))
    store[box + (0,)].write(block.transpose(2, 1, 0)).result()
    if mesh_scale is not None:  # full-resolution volumes, for the segment list
      for i, n in zip(*[v.tolist() for v in np.unique(block, return_counts=True)]):
        if i:
          voxels[i] = voxels.get(i, 0) + n
  scales = [{"shape_zyx": shape, "voxel_size_nm": size, "origin_zyx": origin}]
  for fz, fy, fx in scale_factors(shape, size, max_scales):
    coarse = ts.downsample(store, [fx, fy, fz, 1], method=method)
    origin = [int(n) for n in coarse.domain.inclusive_min[2::-1]]
    shape = [int(n) for n in coarse.domain.shape[2::-1]]
    size = [size[0] * fz, size[1] * fy, size[2] * fx]
    store, chunk = _create_scale(path, kind, stored, shape, size, origin, len(scales))
    for b in blocks.iterate(shape, [c * k for c, k in zip(chunk, block_chunks)]):
      box = tuple(slice(a + o, z + o) for a, z, o in zip(b.start[::-1], b.stop[::-1],
                                                          origin[::-1]))
      store[box].write(coarse[box].read().result()).result()
    scales.append({"shape_zyx": shape, "voxel_size_nm": size, "origin_zyx": origin})
  base = scales[0]
  result = {"type": kind, "data_type": stored, "scales": scales,
            "translation_nm": [o * v for o, v in zip(base["origin_zyx"],
                                                      base["voxel_size_nm"])]}
  if is_ome_zarr(path):
    _write_ome_group(path, kind, method, scales, rest)
    result["format"] = "OME-Zarr 0.5"
    result["translation_nm"] = [float(t) for t in translation_nm]
  if mesh_scale is not None:
    result["meshes"] = _add_meshes(path, min(int(mesh_scale), len(scales) - 1),
                                   scales, voxels, mesh_cubes)
  return result


def _write_ome_group(path: str, kind: str, method: str, scales: list[dict],
                     rest_nm: np.ndarray) -> None:
  """The OME-Zarr 0.5 image group over the levels (labels: an image-label,
  which napari opens as a labels layer). Each level's scale transform is its
  voxel size; its translation is where its voxel 0 lies (its origin in its
  own voxels, plus `rest_nm`, the sub-voxel part of scale 0's), shifted so
  that a coarse voxel's centre is the centre of the fine voxels it stands
  for."""
  base = np.asarray(scales[0]["voxel_size_nm"], float)
  datasets = []
  for level, scale in enumerate(scales):
    size = np.asarray(scale["voxel_size_nm"], float)
    shift = np.asarray(scale["origin_zyx"]) * size + rest_nm + (size - base) / 2
    datasets.append({"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": size.tolist()},
        {"type": "translation", "translation": shift.tolist()}]})
  ome = {"version": "0.5", "multiscales": [{
      "name": os.path.basename(os.path.normpath(path)),
      "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")],
      "datasets": datasets, "type": method,
      "metadata": {"method": "tensorstore.downsample", "description": (
          "most frequent id of each box, ties to the smaller" if method == "mode"
          else "mean of each box, rounded half to even")}}]}
  if kind == "segmentation":
    ome["image-label"] = {}
  with open(os.path.join(path, "zarr.json"), "w") as f:
    json.dump({"zarr_format": 3, "node_type": "group", "attributes": {"ome": ome}}, f,
              indent=2)


def _add_meshes(path: str, scale: int, scales: list[dict], voxels: dict[int, int],
                cubes: Sequence[int]) -> dict:
  """mesh/ and segment_properties/ beside the scales, named in `info`."""
  labels = sources.open_volume(f"{path}#scale={scale}")
  stats = meshes.write_legacy_meshes(labels, os.path.join(path, "mesh"),
                                     scales[scale]["voxel_size_nm"], cubes=cubes)
  meshes.write_segment_properties(os.path.join(path, "segment_properties"), voxels,
                                  scales[0]["voxel_size_nm"])
  info_path = os.path.join(path, "info")
  with open(info_path) as f:
    info = json.load(f)
  info.update(mesh="mesh", segment_properties="segment_properties")
  with open(info_path + ".tmp", "w") as f:
    json.dump(info, f)
  os.replace(info_path + ".tmp", info_path)
  # ids too small to survive mode downsampling to that scale have no mesh
  return dict(stats, scale=scale, without_mesh=len(voxels) - stats["objects"])
