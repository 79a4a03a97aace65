"""Legacy precomputed meshes: blockwise fragments against whole-volume marching
cubes, closed and outward surfaces, the byte format as neuroglancer's spec
states it, and segment properties against numpy voxel counts."""

import json
import os

import numpy as np
import pytest
from skimage import measure

from stt_jax.data import meshes, pyramid, sources
from stt_jax.errors import UserError

SPACING = (30.0, 8.0, 8.0)  # z, y, x nm


def _labels():
  """Objects touching each other, the volume's faces and a corner; one voxel
  thin parts; anisotropic spacing."""
  z, y, x = np.mgrid[:9, :30, :34]
  labels = np.zeros((9, 30, 34), np.uint32)
  labels[((z - 4) * 3.75) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 64] = 7
  labels[(((z - 4) * 3.75) ** 2 + (y - 12) ** 2 + (x - 25) ** 2 <= 30) & (labels == 0)] = 3
  labels[:3, 22:, 28:] = 12                # a box in the volume's corner
  labels[0:9, 26, 2:20] = 40              # a one-voxel-thin wall along the faces
  labels[5, 2, 30] = 41                   # a single voxel
  return labels


def _parse_fragment(path):
  """The spec's layout, read independently of stt_jax."""
  data = open(path, "rb").read()
  n = int.from_bytes(data[:4], "little")
  vertices = np.frombuffer(data[4:4 + 12 * n], dtype="<f4").reshape(n, 3)
  rest = data[4 + 12 * n:]
  assert len(rest) % 12 == 0
  return vertices, np.frombuffer(rest, dtype="<u4").reshape(-1, 3)


def _object_mesh(mesh_dir, object_id):
  manifest = json.load(open(os.path.join(mesh_dir, f"{object_id}:0")))
  parts = [_parse_fragment(os.path.join(mesh_dir, name)) for name in manifest["fragments"]]
  return [v[t] for v, t in parts]  # [triangles, 3 corners, xyz] per fragment


def _canonical(triangles):
  """Triangles as sorted tuples of rounded corners, each rotated to start at
  its smallest corner (orientation kept)."""
  out = []
  for tri in np.round(np.asarray(triangles, np.float64), 3):
    corners = [tuple(c) for c in tri]
    k = corners.index(min(corners))
    out.append(tuple(corners[k:] + corners[:k]))
  return sorted(out)


def _reference(labels, object_id):
  """Whole-volume marching cubes of the zero-padded mask, x, y, z nm."""
  mask = np.pad(labels == object_id, 1).astype(np.float32)
  verts, faces, _, _ = measure.marching_cubes(mask, level=0.5, spacing=SPACING)
  verts = (verts - np.asarray(SPACING))[:, ::-1]  # padding off; z, y, x -> x, y, z
  return verts[faces]


def _signed_volume(triangles):
  a, b, c = (triangles[:, i].astype(np.float64) for i in range(3))
  return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


@pytest.mark.parametrize("cubes", [(2, 7, 5), (64, 256, 256)])
def test_block_fragments_are_whole_volume_marching_cubes(tmp_path, cubes):
  labels = _labels()
  volume = sources.write_array(str(tmp_path / "l.zarr"), labels)
  mesh_dir = str(tmp_path / "mesh")
  stats = meshes.write_legacy_meshes(volume, mesh_dir, SPACING, cubes=cubes)
  ids = [i for i in np.unique(labels).tolist() if i]
  assert stats["objects"] == len(ids)
  assert json.load(open(os.path.join(mesh_dir, "info"))) == {"@type": "neuroglancer_legacy_mesh"}
  total = 0
  for object_id in ids:
    ours = np.concatenate(_object_mesh(mesh_dir, object_id))
    total += len(ours)
    assert _canonical(ours) == _canonical(_reference(labels, object_id)), object_id
  assert stats["triangles"] == total
  if cubes == (2, 7, 5):  # several blocks: objects split into fragments
    assert stats["fragments"] > 2 * len(ids)


def test_surfaces_are_closed_outward_and_enclose_the_voxels(tmp_path):
  labels = _labels()
  volume = sources.write_array(str(tmp_path / "l.zarr"), labels)
  meshes.write_legacy_meshes(volume, str(tmp_path / "mesh"), SPACING, cubes=(3, 8, 8))
  voxel = float(np.prod(SPACING))
  for object_id in (7, 3, 12):
    triangles = np.concatenate(_object_mesh(str(tmp_path / "mesh"), object_id))
    # closed: with corners merged by position, every edge bounds two triangles,
    # once in each direction (a consistently wound surface)
    keys = {}
    index = lambda p: keys.setdefault(tuple(np.round(p, 3)), len(keys))
    edges = {}
    for tri in triangles:
      ids = [index(c) for c in tri]
      for a, b in zip(ids, ids[1:] + ids[:1]):
        edges[(a, b)] = edges.get((a, b), 0) + 1
    assert all(n == 1 and edges.get((b, a)) == 1 for (a, b), n in edges.items()), object_id
    enclosed = _signed_volume(triangles)
    count = int((labels == object_id).sum())
    # level 0.5 cuts corners: a little under the voxels' volume, never above
    assert 0.6 * count * voxel < enclosed < count * voxel, (object_id, enclosed, count * voxel)
    lo = np.argwhere(labels == object_id).min(0)[::-1] * np.asarray(SPACING[::-1])
    hi = np.argwhere(labels == object_id).max(0)[::-1] * np.asarray(SPACING[::-1])
    assert (triangles.reshape(-1, 3) >= lo - np.asarray(SPACING[::-1])).all()
    assert (triangles.reshape(-1, 3) <= hi + np.asarray(SPACING[::-1])).all()


def test_pyramid_with_meshes_names_them_and_lists_every_volume(tmp_path):
  labels = np.zeros((4, 600, 40), np.uint32)
  labels[1:3, 100:300, 5:30] = 5
  labels[:, 320:330, 10:12] = 9
  labels[2, 590:, 39] = 70000
  source = sources.write_array(str(tmp_path / "labels.zarr"), labels)
  out = str(tmp_path / "ng")
  info = pyramid.write_pyramid(source, out, voxel_size_nm=SPACING, mesh_scale=5)
  assert len(info["scales"]) == 3 and info["meshes"]["scale"] == 2  # the coarsest
  # the 10 x 2 and the 10 x 1 voxel objects vanish at 4x coarser y/x: listed, no mesh
  assert (info["meshes"]["objects"], info["meshes"]["without_mesh"]) == (1, 2)
  manifests = [n for n in os.listdir(os.path.join(out, "mesh")) if n.count(":") == 1]
  assert manifests == ["5:0"]
  stored = json.load(open(os.path.join(out, "info")))
  assert stored["mesh"] == "mesh" and stored["segment_properties"] == "segment_properties"
  assert stored["scales"][0]["resolution"] == [8.0, 8.0, 30.0]  # TensorStore's info kept
  props = json.load(open(os.path.join(out, "segment_properties", "info")))
  assert props["@type"] == "neuroglancer_segment_properties"
  ids, counts = np.unique(labels[labels > 0], return_counts=True)
  assert props["inline"]["ids"] == [str(i) for i in ids]
  [volume] = props["inline"]["properties"]
  assert (volume["id"], volume["type"], volume["data_type"]) == ("volume_um3", "number", "float32")
  np.testing.assert_allclose(volume["values"], counts * np.prod(SPACING) * 1e-9, rtol=1e-5)
  # meshes from the coarsest scale: 30 x 32 x 32 nm voxels, vertices still in nm
  triangles = np.concatenate(_object_mesh(os.path.join(out, "mesh"), 5))
  assert _signed_volume(triangles) > 0
  lo, hi = triangles.reshape(-1, 3).min(0), triangles.reshape(-1, 3).max(0)
  assert (lo >= [5 * 8 - 32, 100 * 8 - 32, 30 - 30]).all()
  assert (hi <= [30 * 8 + 32, 300 * 8 + 32, 3 * 30 + 30]).all()
  # opened again as a volume: still a precomputed segmentation
  reread = sources.open_volume(out)
  np.testing.assert_array_equal(reread.read((0, 0, 0), reread.shape), labels)


def test_meshes_of_an_image_are_refused(tmp_path):
  image = sources.write_array(str(tmp_path / "im.zarr"), np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(UserError, match="meshes are made of instance labels"):
    pyramid.write_pyramid(image, str(tmp_path / "ng"), voxel_size_nm=SPACING, mesh_scale=0)
  assert not os.path.exists(tmp_path / "ng")


def test_meshes_move_with_the_volume(tmp_path):
  """A labels volume placed at (60, 40, 24) nm: each fragment is the one of
  the same labels at the origin, shifted by (24, 40, 60) x, y, z nm."""
  labels = _labels()
  at_origin = sources.write_array(str(tmp_path / "a.zarr"), labels)
  placed = sources.create_volume(str(tmp_path / "b.zarr"), labels.shape, np.uint32,
                                 translation_nm=(60, 40, 24))
  placed.write((0, 0, 0), labels)
  for name, volume in (("a", at_origin), ("b", placed)):
    pyramid.write_pyramid(volume, str(tmp_path / name / "ng"), voxel_size_nm=SPACING,
                          mesh_scale=0)
  for object_id in (3, 7, 12, 40, 41):
    a = _object_mesh(str(tmp_path / "a" / "ng" / "mesh"), object_id)
    b = _object_mesh(str(tmp_path / "b" / "ng" / "mesh"), object_id)
    assert len(a) == len(b) > 0
    for fa, fb in zip(a, b):
      np.testing.assert_allclose(fb, fa + np.float32([24, 40, 60]), atol=1e-3)
