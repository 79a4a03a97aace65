"""Every source format: write a small volume with that format's own tools, open
it through `sources.open_volume`, read boxes, convert it to zarr."""

import json
import os

import numpy as np
import pytest
import tensorstore as ts

from stt_jax.data import sources
from stt_jax.errors import UserError

SHAPE = (5, 24, 32)


@pytest.fixture(scope="module")
def volume():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, SHAPE, dtype=np.uint8)


def _zarr2(path, a):
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path},
                   "metadata": {"shape": list(a.shape), "chunks": [2, 8, 8],
                                "dtype": "|u1"}}, create=True).result()
  store.write(a).result()


def _n5_xyz(path, a):
  """As Java N5 tools write: dimensions x, y, z, with an `axes` attribute."""
  store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": path},
                   "metadata": {"dimensions": list(a.shape[::-1]), "blockSize": [8, 8, 2],
                                "dataType": "uint8", "compression": {"type": "gzip"}}},
                  create=True).result()
  store.write(a.T).result()
  meta = os.path.join(path, "attributes.json")
  attrs = json.load(open(meta))
  attrs.update(axes=["x", "y", "z"], resolution=[8.0, 8.0, 30.0])
  json.dump(attrs, open(meta, "w"))


def _precomputed(path, a):
  store = ts.open({"driver": "neuroglancer_precomputed",
                   "kvstore": {"driver": "file", "path": path},
                   "multiscale_metadata": {"type": "image", "data_type": "uint8",
                                           "num_channels": 1},
                   "scale_metadata": {"size": list(a.shape[::-1]), "resolution": [8, 8, 30],
                                      "encoding": "raw", "chunk_size": [8, 8, 2],
                                      "voxel_offset": [3, 0, 1]}},
                  create=True).result()
  store[ts.d[:].translate_to[0]][..., 0].write(a.T).result()


def _tiff_stack(path, a, compress=False):
  import tifffile
  tifffile.imwrite(path, a, compression="zlib" if compress else None)


def _slice_folder(path, a, suffix):
  os.makedirs(path)
  for z in range(a.shape[0]):  # unpadded numbers: sorted by value, not as text
    name = os.path.join(path, f"im{z}{suffix}")
    if suffix == ".png":
      from PIL import Image
      Image.fromarray(a[z]).save(name)
    else:
      import tifffile
      tifffile.imwrite(name, a[z])


def _hdf5(path, a):
  import h5py
  with h5py.File(path, "w") as f:
    f.create_dataset("volumes/raw", data=a, chunks=(2, 8, 8), compression="gzip")
    f["volumes/raw"].attrs["resolution"] = [30.0, 8.0, 8.0]
  return path + ":volumes/raw"


def _nifti(path, a, gz):
  """NIfTI stores (x, y, z); voxel size 8 x 8 x 30 nm written in microns."""
  import nibabel
  image = nibabel.Nifti1Image(np.ascontiguousarray(a.transpose(2, 1, 0)), np.eye(4))
  image.header.set_zooms((0.008, 0.008, 0.030))
  image.header.set_xyzt_units("micron")
  path += ".nii.gz" if gz else ".nii"
  nibabel.save(image, path)
  return path


WRITERS = {
    "zarr3": lambda p, a: sources.write_array(p, a, voxel_size_nm=(30, 8, 8)) and p,
    "zarr2": lambda p, a: _zarr2(p, a) or p,
    "n5": lambda p, a: _n5_xyz(p, a) or p,
    "precomputed": lambda p, a: _precomputed(p, a) or p,
    "tiff_stack": lambda p, a: _tiff_stack(p + ".tif", a) or p + ".tif",
    "tiff_stack_zlib": lambda p, a: _tiff_stack(p + ".tif", a, True) or p + ".tif",
    "png_folder": lambda p, a: _slice_folder(p, a, ".png") or p,
    "tiff_folder": lambda p, a: _slice_folder(p, a, ".tif") or p,
    "hdf5": lambda p, a: _hdf5(p + ".h5", a),
    "nifti": lambda p, a: _nifti(p, a, False),
    "nifti_gz": lambda p, a: _nifti(p, a, True),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_round_trip(tmp_path, volume, fmt):
  path = WRITERS[fmt](str(tmp_path / "v"), volume)
  vol = sources.open_volume(path)
  assert vol.shape == SHAPE and vol.dtype == np.uint8
  np.testing.assert_array_equal(vol.read([0, 0, 0], SHAPE), volume)
  np.testing.assert_array_equal(vol.read([1, 5, 7], [3, 10, 20]), volume[1:4, 5:15, 7:27])
  if fmt in ("zarr3", "n5", "precomputed", "hdf5", "nifti", "nifti_gz"):
    assert vol.voxel_size_nm == (30.0, 8.0, 8.0)
  out = sources.convert_to_zarr(vol, str(tmp_path / "converted.zarr"), slab_depth=2)
  np.testing.assert_array_equal(sources.open_volume(out.path).read([0, 0, 0], SHAPE), volume)
  with pytest.raises(ValueError, match="leaves"):
    vol.read([4, 0, 0], [2, 24, 32])


def test_region_is_a_volume_of_its_own(tmp_path, volume):
  vol = sources.open_volume(WRITERS["zarr3"](str(tmp_path / "v.zarr"), volume))
  region = sources.RegionVolume(vol, (1, 4, 8), (4, 20, 30))
  assert region.shape == (3, 16, 22)
  np.testing.assert_array_equal(region.read([0, 0, 0], region.shape), volume[1:4, 4:20, 8:30])
  np.testing.assert_array_equal(region.read([1, 2, 3], [2, 5, 5]), volume[2:4, 6:11, 11:16])
  with pytest.raises(UserError, match="not inside"):
    sources.RegionVolume(vol, (0, 0, 0), (6, 24, 32))


def test_bad_paths_are_one_line_errors(tmp_path, volume):
  with pytest.raises(UserError, match="volume not found"):
    sources.open_volume(str(tmp_path / "missing.zarr"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="is not a volume"):
    sources.open_volume(str(tmp_path / "empty"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(UserError, match="unknown volume format"):
    sources.open_volume(str(tmp_path / "notes.txt"))
  (tmp_path / "section.png").write_bytes(b"")  # one section is not a volume
  with pytest.raises(UserError, match="one 2D image.*pass that folder"):
    sources.open_volume(str(tmp_path / "section.png"))
  import h5py
  with h5py.File(tmp_path / "two.h5", "w") as f:
    f["a"] = volume
    f["b"] = volume
  with pytest.raises(UserError, match="holds 2 datasets"):
    sources.open_volume(str(tmp_path / "two.h5"))
  with pytest.raises(UserError, match="no dataset 'c'"):
    sources.open_volume(str(tmp_path / "two.h5") + ":c")
  np.testing.assert_array_equal(
      sources.open_volume(str(tmp_path / "two.h5") + ":b").read([0, 0, 0], SHAPE), volume)
  with pytest.raises(UserError, match="read-only"):
    sources.open_volume(str(tmp_path / "two.h5") + ":b").write([0, 0, 0], volume)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_one_bit_mask_slices_read_as_0_255(tmp_path, suffix):
  """Mask folders mix 8-bit and 1-bit images (VNC III sections 1 and 7): a
  1-bit slice must read as 0/255 like its neighbours, or a threshold of 128
  empties it; a slice of another type is an error, not a silent cast."""
  from PIL import Image
  import tifffile
  rng = np.random.default_rng(1)
  masks = rng.random((3, 16, 16)) < 0.3
  folder = tmp_path / "masks"
  folder.mkdir()
  for z, mask in enumerate(masks):
    path = str(folder / f"{z:02d}{suffix}")
    if z == 1:  # 1-bit
      if suffix == ".png":
        Image.fromarray(mask).convert("1").save(path)
      else:
        tifffile.imwrite(path, mask)
    else:  # 8-bit, 0/255
      Image.fromarray(mask.astype(np.uint8) * 255).save(path) if suffix == ".png" else \
          tifffile.imwrite(path, mask.astype(np.uint8) * 255)
  vol = sources.open_volume(str(folder))
  got = vol.read([0, 0, 0], vol.shape)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.where(masks, 255, 0))
  tifffile.imwrite(str(folder / f"{1:02d}{suffix}").replace(suffix, ".tif"),
                   masks[1].astype(np.uint16) * 1000)
  if suffix == ".tif":
    with pytest.raises(UserError, match="holds uint16, the first slice"):
      vol.read([0, 0, 0], vol.shape)


def test_convert_on_the_command_line(tmp_path, volume):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  stack = WRITERS["tiff_stack"](str(tmp_path / "stack"), volume)
  out = str(tmp_path / "stack.zarr")
  cmd = [sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py", "--mode=convert",
         f"--input={stack}", f"--output={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  converted = sources.open_volume(out)
  np.testing.assert_array_equal(converted.read([0, 0, 0], SHAPE), volume)
  assert converted.voxel_size_nm == (30.0, 8.0, 8.0)  # from the config: TIFF has none
  again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in again.stderr.strip().splitlines() if l.strip()]
  assert again.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0]


def test_convert_a_region_and_one_line_region_errors(tmp_path, volume):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  stack = WRITERS["tiff_stack"](str(tmp_path / "stack"), volume)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  def main(*args):
    return subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                           f"--input={stack}", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  crop = str(tmp_path / "crop.zarr")
  proc = main("--mode=convert", f"--output={crop}", "--region=((1,4,8),(4,20,30))")
  assert proc.returncode == 0, proc.stderr[-2000:]
  converted = sources.open_volume(crop)
  np.testing.assert_array_equal(converted.read([0, 0, 0], converted.shape),
                                volume[1:4, 4:20, 8:30])
  refused = f"--output={tmp_path / 'x.zarr'}"
  for args, needle in [
      (("--mode=convert", refused, "--region=(1,4,8)"), "give ((z0,y0,x0)"),
      (("--mode=convert", refused, "--region=((0,0,0),(6,24,32))"), "not inside"),
      (("--mode=segment", "--output=o", "--workdir=w", "--region=((0,0,0),(2,2))"),
       "give (z, y, x)"),
      (("--mode=train", "--workdir=w", "--region=((0,0,0),(2,8,8))"), "does nothing"),
      (("--mode=segment", "--output=o", "--workdir=w", "--intensity_range=auto"),
       "does nothing")]:
    proc = main(*args)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, proc.stderr)
  assert not os.path.exists(tmp_path / "x.zarr")


def test_config_regions_split_one_volume(tmp_path, volume):
  from stt_jax.config import default_config
  from stt_jax.data import datasets
  image = WRITERS["hdf5"](str(tmp_path / "im"), volume)
  labels = sources.write_array(str(tmp_path / "lab.zarr"), (volume > 128).astype(np.uint32)).path
  cfg = default_config()
  cfg.data.train.update(image=image, label=labels, region=((0, 0, 0), (3, 24, 32)))
  cfg.data.val.update(image=image, label=labels, region=((3, 0, 0), (5, 24, 32)))
  train_image, _ = datasets.open_split(cfg, "train")
  val_image, val_labels = datasets.open_split(cfg, "val")
  assert train_image.shape == (3, 24, 32) and val_image.shape == (2, 24, 32)
  np.testing.assert_array_equal(val_image.read([0, 0, 0], [2, 24, 32]), volume[3:])
  np.testing.assert_array_equal(val_labels.read([0, 0, 0], [2, 24, 32]), volume[3:] > 128)
  cfg.data.val.region = ((3, 0, 0), (6, 24, 32))
  with pytest.raises(UserError, match="config.data.val.region.*not inside"):
    datasets.open_split(cfg, "val")
  cfg.data.val.image = str(tmp_path / "none.h5")
  with pytest.raises(UserError, match="config.data.val.image.*none.h5"):
    datasets.open_split(cfg, "val")


def test_validation_context_reads_the_image_around_the_region(tmp_path, volume):
  from stt_jax.config import default_config
  from stt_jax.data import datasets
  image = sources.write_array(str(tmp_path / "im.zarr"), volume).path
  labels = sources.write_array(str(tmp_path / "lab.zarr"), (volume > 128).astype(np.uint32)).path
  cfg = default_config()
  cfg.data.val.update(image=image, label=labels, region=((3, 4, 0), (5, 20, 32)),
                      context=(2, 3, 1))
  grown, inside, offset = datasets.open_split_with_context(cfg, "val")
  # z: 3 - 2 = 1 up to 5 + 2, cut at the volume's 5; y: 4 - 3 .. 20 + 3; x: cut on both sides
  assert grown.shape == (4, 22, 32) and offset == (2, 3, 0)
  np.testing.assert_array_equal(grown.read([0, 0, 0], grown.shape), volume[1:5, 1:23, :])
  np.testing.assert_array_equal(inside.read([0, 0, 0], inside.shape),
                                volume[3:5, 4:20] > 128)
  # the region's own image is the grown image cropped at the offset
  np.testing.assert_array_equal(grown.read(offset, inside.shape), volume[3:5, 4:20])
  # without context, or without a region, it is open_split's pair
  cfg.data.val.context = (0, 0, 0)
  plain, _, offset = datasets.open_split_with_context(cfg, "val")
  assert plain.shape == inside.shape and offset == (0, 0, 0)
  cfg.data.val.update(region=(), context=(2, 2, 2))
  whole, _, offset = datasets.open_split_with_context(cfg, "val")
  assert whole.shape == volume.shape and offset == (0, 0, 0)


def _ome_04_group(path, levels, axes, dataset_scales, global_scale=None,
                  dataset_translations=None):
  """An OME-Zarr 0.4 image written as the spec lays it out: zarr v2 arrays
  s0, s1, ... and the multiscales list in the group's .zattrs."""
  import tensorstore as ts
  os.makedirs(path)
  with open(os.path.join(path, ".zgroup"), "w") as f:
    json.dump({"zarr_format": 2}, f)
  for k, level in enumerate(levels):
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                   "path": os.path.join(path, f"s{k}")},
                     "metadata": {"shape": list(level.shape), "chunks": list(level.shape),
                                  "dtype": level.dtype.str}}, create=True).result()
    store.write(level).result()
  multiscale = {"version": "0.4", "axes": axes, "datasets": [
      {"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": s}]}
      for k, s in enumerate(dataset_scales)]}
  for dataset, shift in zip(multiscale["datasets"], dataset_translations or []):
    dataset["coordinateTransformations"].append({"type": "translation", "translation": shift})
  if global_scale:
    multiscale["coordinateTransformations"] = [{"type": "scale", "scale": global_scale}]
  with open(os.path.join(path, ".zattrs"), "w") as f:
    json.dump({"multiscales": [multiscale]}, f)


def test_ome_zarr_04_images_open_as_zyx_with_their_voxel_size(tmp_path, volume):
  """t, c, z, y, x in micrometres with a multiscale-wide scale on top (the
  level's z scale 0.015 um x 2 = 30 nm); time and channel of one element."""
  axes = [{"name": "t", "type": "time", "unit": "second"},
          {"name": "c", "type": "channel"}] + [
              {"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")]
  coarse = volume[:, ::2, ::2]
  path = str(tmp_path / "em.ome.zarr")
  _ome_04_group(path, [volume[None, None], coarse[None, None]], axes,
                [[1, 1, 0.015, 0.008, 0.008], [1, 1, 0.015, 0.016, 0.016]],
                global_scale=[1, 1, 2, 1, 1])
  whole = sources.open_volume(path)
  assert whole.shape == volume.shape
  np.testing.assert_allclose(whole.voxel_size_nm, (30.0, 8.0, 8.0))
  np.testing.assert_array_equal(whole.read([0, 0, 0], whole.shape), volume)
  level = sources.open_volume(path + "#scale=1")
  np.testing.assert_allclose(level.voxel_size_nm, (30.0, 16.0, 16.0))
  np.testing.assert_array_equal(level.read([1, 2, 3], (2, 5, 6)), coarse[1:3, 2:7, 3:9])
  with pytest.raises(UserError, match="2 levels; #scale=2 is not one of them"):
    sources.open_volume(path + "#scale=2")


def test_ome_zarr_refusals_name_what_is_wrong(tmp_path, volume):
  space = [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")]
  channels = str(tmp_path / "rgb.ome.zarr")
  _ome_04_group(channels, [np.stack([volume] * 3)], [{"name": "c", "type": "channel"}] + space,
                [[1, 30, 8, 8]])
  with pytest.raises(UserError, match="axis 'c' has 3 elements; stt_jax reads one channel"):
    sources.open_volume(channels)
  flat = str(tmp_path / "flat.ome.zarr")
  _ome_04_group(flat, [volume[0]], space[1:], [[8, 8]])
  with pytest.raises(UserError, match=r"lack z, y and x"):
    sources.open_volume(flat)
  unitless = str(tmp_path / "unitless.ome.zarr")
  _ome_04_group(unitless, [volume], [{"name": a, "type": "space"} for a in "zyx"], [[1, 1, 1]])
  assert sources.open_volume(unitless).voxel_size_nm is None  # the config's size then


def test_where_a_volume_lies_follows_its_file_its_box_and_a_conversion(tmp_path, volume):
  """translation_nm: an OME-Zarr level's translation (then the multiscale's
  scale, the spec's order; micrometres to nm); a box adds its start times the
  voxel size; --mode=convert keeps it; a file that says nothing lies at 0."""
  import subprocess
  import sys
  space = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")]
  path = str(tmp_path / "em.ome.zarr")
  _ome_04_group(path, [volume, volume[:, ::2, ::2]], space,
                [[0.015, 0.008, 0.008], [0.015, 0.016, 0.016]], global_scale=[2, 1, 1],
                dataset_translations=[[0.5, 0.1, 0.2], [0.5, 0.104, 0.204]])
  # world = (index * scale + translation) * global scale; 1 um = 1000 nm
  np.testing.assert_allclose(sources.open_volume(path).translation_nm, (1000.0, 100.0, 200.0))
  np.testing.assert_allclose(sources.open_volume(path + "#scale=1").translation_nm,
                             (1000.0, 104.0, 204.0))
  box = sources.RegionVolume(sources.open_volume(path), (1, 2, 3), (4, 20, 30))
  np.testing.assert_allclose(sources.world_translation_nm(box, (30, 8, 8)),
                             (1030.0, 116.0, 224.0))
  np.testing.assert_allclose(box.translation_nm, (1030.0, 116.0, 224.0))
  stack = WRITERS["tiff_stack"](str(tmp_path / "stack"), volume)
  assert sources.open_volume(stack).translation_nm is None
  # a box of a file without a voxel size is placed with the configured one
  assert sources.world_translation_nm(sources.RegionVolume(
      sources.open_volume(stack), (1, 0, 2), (3, 4, 5)), (40, 5, 5)) == (40.0, 0.0, 10.0)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  crop = str(tmp_path / "crop.zarr")
  proc = subprocess.run([sys.executable, "-m", "stt_jax.main", "--config=configs/demo.py",
                         "--mode=convert", f"--input={path}", f"--output={crop}",
                         "--region=((1,2,3),(4,20,30))"], cwd=root,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  converted = sources.open_volume(crop)
  np.testing.assert_allclose(converted.translation_nm, (1030.0, 116.0, 224.0))
  np.testing.assert_allclose(converted.voxel_size_nm, (30.0, 8.0, 8.0))
  whole = sources.convert_to_zarr(sources.open_volume(stack), str(tmp_path / "plain.zarr"))
  assert whole.translation_nm is None  # nothing to say: no attribute written
