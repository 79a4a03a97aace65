"""Surface meshes of instances for neuroglancer's 3D view, block by block.

Neuroglancer shows a segmentation's objects in 3D only from meshes. This
writes the legacy single-resolution precomputed format (`mesh/` beside a
pyramid's scales, "neuroglancer_legacy_mesh"): per object a JSON manifest
`<id>:0` listing fragment files, each fragment little-endian uint32
vertex count, float32 x, y, z vertices in nm, uint32 triangle indices.

Marching cubes (scikit-image, level 0.5 of each object's mask) runs over
blocks of cubes, a cube spanning voxels i and i + 1 on each axis and the
volume taken as zero-padded by one voxel, so surfaces close at its faces.
Each block owns a disjoint range of cubes and reads one voxel beyond it, so
every cube is meshed exactly once: the fragments of an object together are
the surface whole-volume marching cubes gives (seams share positions, not
vertex indices). Memory is one block, whatever the volume's size.

`segment_properties/` lists every id with its volume (µm³, from the voxel
counts at full resolution), so neuroglancer's segment list can show, sort
and select them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage import measure

from stt_jax.data.sources import Volume
from stt_jax.infer import blocks

CUBES_PER_BLOCK = (64, 256, 256)  # (z, y, x)


def _cube_blocks(shape: Sequence[int], cubes: Sequence[int]):
  """Blocks of cube starts over [-1, n - 1) per axis (the padded volume)."""
  for b in blocks.iterate([n + 1 for n in shape], cubes):
    yield b.index, [a - 1 for a in b.start], [z - 1 for z in b.stop]


def _read_padded(labels: Volume, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
  """Voxels [start, stop] (stop included) of `labels`, zeros outside it."""
  shape = labels.shape[:3]
  lo = [max(a, 0) for a in start]
  hi = [min(z + 1, n) for z, n in zip(stop, shape)]
  inside = np.asarray(labels.read(lo, [h - l for l, h in zip(lo, hi)]))
  pads = [(l - a, z + 1 - h) for a, z, l, h in zip(start, stop, lo, hi)]
  return np.pad(inside, pads) if any(p != (0, 0) for p in pads) else inside


def object_surfaces(region: np.ndarray, origin: Sequence[int],
                    voxel_size_nm: Sequence[float]):
  """Yields (id, vertices [n, 3] float32 x, y, z nm, triangles [m, 3]
  uint32) of each nonzero id of `region` [z, y, x], whose voxel 0 lies at
  `origin` (voxels) in the volume; triangles wind counter-clockwise seen
  from outside (the enclosed volume of the divergence theorem is positive)."""
  ids, inverse = np.unique(region, return_inverse=True)
  inverse = inverse.reshape(region.shape)
  spacing = np.asarray(voxel_size_nm, np.float64)
  for k, box in enumerate(ndimage.find_objects(inverse + 1)):
    if box is None or ids[k] == 0:
      continue
    # one voxel around the object, inside the region: every cube it touches
    crop = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                 for s, n in zip(box, region.shape))
    mask = (inverse[crop] == k).astype(np.float32)
    if mask.min() > 0:  # the block's cubes lie inside the object: no surface here
      continue
    verts, faces, _, _ = measure.marching_cubes(mask, level=0.5, spacing=tuple(spacing))
    verts += (np.asarray([c.start for c in crop]) + np.asarray(origin)) * spacing
    # scikit-image winds clockwise seen from outside in z, y, x; read as
    # x, y, z (a mirror) the same order is counter-clockwise
    yield int(ids[k]), verts[:, ::-1].astype(np.float32), faces.astype(np.uint32)


def fragment_bytes(vertices: np.ndarray, triangles: np.ndarray) -> bytes:
  return (np.uint32(len(vertices)).astype("<u4").tobytes()
          + vertices.astype("<f4").tobytes() + triangles.astype("<u4").tobytes())


def write_legacy_meshes(labels: Volume, mesh_dir: str, voxel_size_nm: Sequence[float], *,
                        cubes: Sequence[int] = CUBES_PER_BLOCK) -> dict:
  """Meshes of every id of `labels` [z, y, x] into `mesh_dir` (created).
  Returns {"objects", "fragments", "triangles"}."""
  os.makedirs(mesh_dir)
  with open(os.path.join(mesh_dir, "info"), "w") as f:
    json.dump({"@type": "neuroglancer_legacy_mesh"}, f)
  shape = [int(n) for n in labels.shape[:3]]
  # where the volume lies (a precomputed scale's voxel offset), x, y, z
  shift = np.asarray(labels.translation_nm or (0.0, 0.0, 0.0), np.float32)[::-1]
  fragments: dict[int, list[str]] = {}
  triangles = 0
  for index, start, stop in _cube_blocks(shape, cubes):
    region = _read_padded(labels, start, stop)
    for object_id, verts, faces in object_surfaces(region, start, voxel_size_nm):
      name = f"{object_id}:0:{index}"
      with open(os.path.join(mesh_dir, name), "wb") as f:
        f.write(fragment_bytes(verts + shift, faces))
      fragments.setdefault(object_id, []).append(name)
      triangles += len(faces)
  for object_id, names in fragments.items():
    with open(os.path.join(mesh_dir, f"{object_id}:0"), "w") as f:
      json.dump({"fragments": names}, f)
  return {"objects": len(fragments), "fragments": sum(map(len, fragments.values())),
          "triangles": triangles}


def write_segment_properties(directory: str, voxels: dict[int, int],
                             voxel_size_nm: Sequence[float]) -> None:
  """Neuroglancer's inline segment properties: every id, its volume in µm³."""
  os.makedirs(directory)
  ids = sorted(voxels)
  per_voxel = float(np.prod(voxel_size_nm)) * 1e-9
  info = {"@type": "neuroglancer_segment_properties",
          "inline": {"ids": [str(i) for i in ids],
                     "properties": [{"id": "volume_um3", "type": "number",
                                     "data_type": "float32",
                                     "description": "volume (µm³)",
                                     "values": [float(f"{voxels[i] * per_voxel:.6g}")
                                                for i in ids]}]}}
  with open(os.path.join(directory, "info"), "w") as f:
    json.dump(info, f)
