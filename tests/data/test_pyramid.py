"""Neuroglancer precomputed pyramids: every scale against a numpy reference
(mode of each 2x2(x2) box, ties to the smaller id; mean, half to even)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from stt_jax.data import pyramid, sources
from stt_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _boxes(shape, factors):
  """Yields (output index, slices of the input box) for every output voxel."""
  out = [math.ceil(n / f) for n, f in zip(shape, factors)]
  for index in np.ndindex(*out):
    yield index, tuple(slice(i * f, min((i + 1) * f, n))
                       for i, f, n in zip(index, factors, shape))


def _mode_reference(volume, factors):
  out = np.zeros([math.ceil(n / f) for n, f in zip(volume.shape, factors)], volume.dtype)
  for index, box in _boxes(volume.shape, factors):
    values, counts = np.unique(volume[box], return_counts=True)  # sorted: first max = smallest
    out[index] = values[np.argmax(counts)]
  return out


def _mean_reference(volume, factors):
  out = np.zeros([math.ceil(n / f) for n, f in zip(volume.shape, factors)], np.uint8)
  for index, box in _boxes(volume.shape, factors):
    out[index] = np.round(volume[box].astype(np.float64).mean())  # half to even
  return out


def test_scales_halve_y_x_and_z_where_that_keeps_voxels_near_cubic():
  # MitoEM: 30 x 8 x 8 nm -> 30x16x16, 30x32x32, then z too: 60x64x64 ...
  assert pyramid.scale_factors((1000, 4096, 4096), (30, 8, 8)) == [
      (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
  assert pyramid.scale_factors((64, 1024, 1024), (8, 8, 8)) == [(2, 2, 2), (2, 2, 2)]
  assert pyramid.scale_factors((1, 2048, 600), (8, 8, 8)) == [(1, 2, 2)] * 3
  assert pyramid.scale_factors((10, 256, 100), (30, 8, 8)) == []
  assert pyramid.scale_factors((1000, 4096, 4096), (30, 8, 8), max_scales=2) == [(1, 2, 2)]


def test_labels_pyramid_equals_mode_downsampling_at_every_scale(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.zeros((5, 24, 600), np.uint32)
  for i in range(1, 40):  # boxes of ids over a background, some touching, odd sizes
    z, y, x = rng.integers(0, [5, 20, 590])
    labels[z:z + rng.integers(1, 4), y:y + rng.integers(1, 9), x:x + rng.integers(1, 30)] = i
  labels[:, :, 300:303] = rng.integers(0, 3, (5, 24, 3))  # ties in many boxes
  source = sources.write_array(str(tmp_path / "labels.zarr"), labels)
  out = str(tmp_path / "labels_ng")
  info = pyramid.write_pyramid(source, out, voxel_size_nm=(30, 8, 8),
                               block_chunks=(1, 1, 1))
  assert info["type"] == "segmentation" and info["data_type"] == "uint32"
  assert [s["shape_zyx"] for s in info["scales"]] == [[5, 24, 600], [5, 12, 300], [5, 6, 150]]
  expected = labels
  for k, factors in enumerate([None, (1, 2, 2), (1, 2, 2)]):
    if factors:
      expected = _mode_reference(expected, factors)
    scale = sources.open_volume(f"{out}#scale={k}")
    assert scale.voxel_size_nm == (30.0, 8.0 * 2 ** k, 8.0 * 2 ** k)
    np.testing.assert_array_equal(scale.read([0, 0, 0], scale.shape), expected)
  with open(os.path.join(out, "info")) as f:
    meta = json.load(f)
  assert meta["type"] == "segmentation" and meta["data_type"] == "uint32"
  assert [s["resolution"] for s in meta["scales"]] == [[8, 8, 30], [16, 16, 30], [32, 32, 30]]
  assert {s["encoding"] for s in meta["scales"]} == {"compressed_segmentation"}
  assert [s["size"] for s in meta["scales"]][0] == [600, 24, 5]  # x, y, z on disk


def test_image_pyramid_equals_mean_downsampling_in_z_too(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (7, 300, 21)).astype(np.uint8)
  source = sources.write_array(str(tmp_path / "image.zarr"), image)
  out = str(tmp_path / "image_ng")
  info = pyramid.write_pyramid(source, out, voxel_size_nm=(8, 8, 8),
                               block_chunks=(1, 1, 1))
  assert info["type"] == "image" and len(info["scales"]) == 2
  scale = sources.open_volume(f"{out}#scale=1")
  assert scale.shape == (4, 150, 11) and scale.voxel_size_nm == (16.0, 16.0, 16.0)
  np.testing.assert_array_equal(scale.read([0, 0, 0], scale.shape),
                                _mean_reference(image, (2, 2, 2)))
  whole = sources.open_volume(out)
  np.testing.assert_array_equal(whole.read([0, 0, 0], whole.shape), image)


def test_refusals_are_one_line_and_touch_nothing(tmp_path):
  floats = sources.write_array(str(tmp_path / "f.zarr"), np.zeros((2, 8, 8), np.float32))
  with pytest.raises(UserError, match=r"is float32: a pyramid is made of uint8 images or "
                                      r"integer labels"):
    pyramid.write_pyramid(floats, str(tmp_path / "f_ng"), voxel_size_nm=(8, 8, 8))
  assert not os.path.exists(tmp_path / "f_ng")
  labels = sources.write_array(str(tmp_path / "l.zarr"), np.ones((2, 8, 8), np.uint16))
  existing = tmp_path / "l_ng"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="already exists; pass --overwrite"):
    pyramid.write_pyramid(labels, str(existing), voxel_size_nm=(8, 8, 8))
  assert (existing / "keep.txt").read_text() == "mine"
  # signed ids: a negative one (found in a later block) is refused, not
  # wrapped to a huge unsigned id, and the partial pyramid is removed
  signed = np.arange(2 * 8 * 600, dtype=np.int32).reshape(2, 8, 600)
  signed[1, 7, 599] = -1
  negative = sources.write_array(str(tmp_path / "s.zarr"), signed)
  with pytest.raises(UserError, match=r"holds negative ids \(-1 in the block at \[0, 0, 576\]"):
    pyramid.write_pyramid(negative, str(tmp_path / "s_ng"), voxel_size_nm=(8, 8, 8),
                          block_chunks=(1, 1, 1))
  assert not os.path.exists(tmp_path / "s_ng")
  signed[1, 7, 599] = 3
  nonnegative = sources.write_array(str(tmp_path / "p.zarr"), signed)
  info = pyramid.write_pyramid(nonnegative, str(tmp_path / "p_ng"), voxel_size_nm=(8, 8, 8))
  assert info["data_type"] == "uint64"
  again = sources.open_volume(str(tmp_path / "p_ng"))
  np.testing.assert_array_equal(again.read((0, 0, 0), again.shape), signed)


def test_command_line_writes_a_pyramid_and_refuses_an_existing_output(tmp_path):
  labels = np.zeros((4, 40, 500), np.uint32)
  labels[1:3, 5:30, 100:400] = 7
  (tmp_path / "seg").mkdir()  # a segment output folder stands for its instances
  path = sources.write_array(str(tmp_path / "seg" / "instances.zarr"), labels).path
  out = tmp_path / "instances_ng"
  command = [sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
             "--mode=pyramid", f"--input={tmp_path / 'seg'}", f"--output={out}",
             "--mesh_scale=1"]
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  assert "neuroglancer precomputed segmentation (uint32), 2 scales" in first.stdout
  assert "meshes of 1 objects from scale 1: " in first.stdout
  assert os.path.isfile(out / "mesh" / "7:0") and os.path.isfile(out / "segment_properties" / "info")
  assert "precomputed://http://<host>/instances_ng" in first.stdout
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0
  assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
  elsewhere = subprocess.run(command[:4] + ["--mode=convert", f"--input={path}",
                                              f"--output={tmp_path / 'c.zarr'}", "--mesh_scale=1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert elsewhere.returncode == 2 and elsewhere.stderr.strip().count("\n") == 0
  assert "--mesh_scale adds meshes to --mode=pyramid" in elsewhere.stderr
  scale = sources.open_volume(f"{out}#scale=1")
  assert scale.shape[1:] == (20, 250) and set(np.unique(scale.read([0, 0, 0], scale.shape))) == {0, 7}


@pytest.mark.parametrize("kind", ["labels", "image"])
def test_ome_zarr_pyramid_follows_the_spec_and_equals_the_references(tmp_path, kind):
  """OME-Zarr 0.5: a zarr v3 group whose attributes.ome names each level,
  its scale and translation; levels read here with TensorStore alone."""
  import tensorstore as ts
  rng = np.random.default_rng(2)
  if kind == "labels":
    volume = rng.integers(0, 4, (3, 600, 40)).astype(np.uint32)
    reference, method = _mode_reference, "mode"
  else:
    volume = rng.integers(0, 256, (3, 600, 40)).astype(np.uint8)
    reference, method = _mean_reference, "mean"
  source = sources.write_array(str(tmp_path / "v.zarr"), volume)
  out = tmp_path / "v.ome.zarr"
  info = pyramid.write_pyramid(source, str(out), voxel_size_nm=(30, 8, 8),
                               block_chunks=(1, 1, 1))
  assert info["format"] == "OME-Zarr 0.5" and len(info["scales"]) == 3
  group = json.load(open(out / "zarr.json"))
  assert (group["zarr_format"], group["node_type"]) == (3, "group")
  ome = group["attributes"]["ome"]
  assert ome["version"] == "0.5" and ("image-label" in ome) == (kind == "labels")
  [multiscale] = ome["multiscales"]
  assert multiscale["axes"] == [{"name": a, "type": "space", "unit": "nanometer"}
                                for a in ("z", "y", "x")]
  assert multiscale["type"] == method
  expected = volume
  for level, dataset in enumerate(multiscale["datasets"]):
    size = [30.0, 8.0 * 2 ** level, 8.0 * 2 ** level]
    # a coarse voxel's centre sits at the centre of the fine voxels it covers
    assert dataset == {"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": size},
        {"type": "translation", "translation": [0.0, (size[1] - 8) / 2, (size[2] - 8) / 2]}]}
    if level:
      expected = reference(expected, (1, 2, 2))
    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                    "path": str(out / str(level))}}).result()
    assert json.load(open(out / str(level) / "zarr.json"))["dimension_names"] == ["z", "y", "x"]
    np.testing.assert_array_equal(array.read().result(), expected)
  # and our reader opens any level with its voxel size
  coarse = sources.open_volume(f"{out}#scale=2")
  assert coarse.voxel_size_nm == (30.0, 32.0, 32.0)
  np.testing.assert_array_equal(coarse.read([0, 0, 0], coarse.shape), expected)
  if kind == "labels":
    cli = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                          "--mode=pyramid", f"--input={source.path}",
                          f"--output={tmp_path / 'cli.ome.zarr'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert ": OME-Zarr 0.5 labels (uint32), 3 scales" in cli.stdout
    assert "napari-ome-zarr" in cli.stdout
    with pytest.raises(UserError, match="meshes go into neuroglancer precomputed"):
      pyramid.write_pyramid(source, str(tmp_path / "m.ome.zarr"), voxel_size_nm=(30, 8, 8),
                            mesh_scale=0)


def _world_mode_reference(volume, origin, factors):
  """Mode of each box of the world grid (multiples of `factors` from index
  0) over the part of it `volume` covers, `volume` starting at `origin`:
  (array, its origin)."""
  lo = [o // f for o, f in zip(origin, factors)]
  hi = [-(-(o + n) // f) for o, n, f in zip(origin, volume.shape, factors)]
  out = np.zeros([b - a for a, b in zip(lo, hi)], volume.dtype)
  for index in np.ndindex(*out.shape):
    box = tuple(slice(max((a + i) * f, o) - o, min((a + i + 1) * f, o + n) - o)
                for a, i, f, o, n in zip(lo, index, factors, origin, volume.shape))
    values, counts = np.unique(volume[box], return_counts=True)
    out[index] = values[np.argmax(counts)]
  return out, lo


def test_pyramids_lie_where_their_source_does(tmp_path):
  """A volume whose voxel 0 lies at (60, 40, 24) nm (2, 5, 3 voxels of 30 x 8
  x 8): precomputed scales carry voxel offsets, coarse scales are the world
  grid's boxes (each an integer offset); OME-Zarr levels put each voxel's
  centre where the fine voxels it stands for have theirs, a sub-voxel
  translation included; meshes are shifted with the volume."""
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, (3, 37, 600)).astype(np.uint32)
  source = sources.create_volume(str(tmp_path / "l.zarr"), labels.shape, np.uint32,
                                 voxel_size_nm=(30, 8, 8), translation_nm=(60, 40, 24))
  source.write((0, 0, 0), labels)
  assert source.translation_nm == (60.0, 40.0, 24.0)
  out = str(tmp_path / "ng")
  info = pyramid.write_pyramid(source, out, voxel_size_nm=(30, 8, 8), block_chunks=(1, 1, 1))
  assert info["translation_nm"] == [60.0, 40.0, 24.0]
  stored = json.load(open(os.path.join(out, "info")))["scales"]
  expected, origin = labels, [2, 5, 3]
  for k, factors in enumerate([None, (1, 2, 2), (1, 2, 2)]):
    if factors:
      expected, origin = _world_mode_reference(expected, origin, factors)
    assert stored[k]["voxel_offset"] == origin[::-1] and info["scales"][k]["origin_zyx"] == origin
    scale = sources.open_volume(f"{out}#scale={k}")
    size = (30.0, 8.0 * 2 ** k, 8.0 * 2 ** k)
    assert scale.translation_nm == tuple(o * s for o, s in zip(origin, size))
    np.testing.assert_array_equal(scale.read([0, 0, 0], scale.shape), expected)
  assert [s["origin_zyx"] for s in info["scales"]] == [[2, 5, 3], [2, 2, 1], [2, 1, 0]]

  # OME-Zarr, 1 nm off the voxel grid in z: kept exactly
  ome = str(tmp_path / "l.ome.zarr")
  info = pyramid.write_pyramid(source, ome, voxel_size_nm=(30, 8, 8), block_chunks=(1, 1, 1),
                               translation_nm=(61, 40, 24))
  assert info["translation_nm"] == [61.0, 40.0, 24.0]
  datasets = json.load(open(os.path.join(ome, "zarr.json")))["attributes"]["ome"][
      "multiscales"][0]["datasets"]
  expected, origin, total = labels, [2, 5, 3], np.ones(3)
  for level, factors in enumerate([None, (1, 2, 2), (1, 2, 2)]):
    if factors:
      expected, origin = _world_mode_reference(expected, origin, factors)
      total = total * factors
    # the centre of level voxel 0's box of fine voxels (fine voxel i at
    # 61 - 2 * 30 + 30 i, ...: the source's voxel 0 is world index 2, 5, 3)
    first = np.asarray(origin) * total
    centre = (first + (total - 1) / 2) * [30, 8, 8] + np.asarray([61, 40, 24]) - \
        np.asarray([2, 5, 3]) * [30, 8, 8]
    assert datasets[level]["coordinateTransformations"][1]["translation"] == \
        pytest.approx(centre.tolist())
    opened = sources.open_volume(f"{ome}#scale={level}")
    assert opened.translation_nm == pytest.approx(centre.tolist())
    np.testing.assert_array_equal(opened.read([0, 0, 0], opened.shape), expected)

  # precomputed holds whole voxels: the same translation rounds, and says so
  cli = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                        "--mode=pyramid", f"--input={ome}", f"--output={tmp_path / 'r'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert cli.returncode == 0, cli.stderr
  assert "placed at z, y, x = 60, 40, 24 nm, where --input lies (precomputed holds whole " \
         "voxels: 61, 40, 24 rounded" in cli.stdout
  assert json.load(open(tmp_path / "r" / "info"))["scales"][0]["voxel_offset"] == [3, 5, 2]
  # a box of it (--region) lies where the box does: its start plus the volume's
  boxed = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                          "--mode=pyramid", f"--input={source.path}",
                          "--region=((1,4,6),(3,30,500))", f"--output={tmp_path / 'box'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert boxed.returncode == 0, boxed.stderr
  assert "placed at z, y, x = 90, 72, 72 nm, where --input lies" in boxed.stdout
  assert json.load(open(tmp_path / "box" / "info"))["scales"][0]["voxel_offset"] == [9, 9, 3]
  box = sources.open_volume(str(tmp_path / "box"))
  np.testing.assert_array_equal(box.read([0, 0, 0], box.shape), labels[1:3, 4:30, 6:500])
