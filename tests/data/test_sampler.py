import ml_collections
import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.data.sampler import PatchSampler
from stt_jax.errors import UserError


def _aug():
  return ml_collections.ConfigDict(dict(enabled=True, flip_z=True, flip_yx=True,
                                        transpose_xy=True, intensity_prob=0.5))


def _sampler(paths, seed=0, **kw):
  return PatchSampler(sources.open_volume(paths["image"]),
                      sources.open_volume(paths["label"]),
                      patch_shape=(4, 32, 32), batch_size=2, seed=seed,
                      augment_config=_aug(), **kw)


def test_batches_are_a_function_of_seed_and_step(small_zarr):
  a, b = _sampler(small_zarr), _sampler(small_zarr)
  for step in (0, 7):
    x, y = a.batch(step), b.batch(step)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["target"], y["target"])
  assert not np.array_equal(a.batch(0)["image"], a.batch(1)["image"])
  streamed = dict(a.iterate(3, 6, prefetch=2))
  np.testing.assert_array_equal(streamed[4]["image"], b.batch(4)["image"])


def test_shapes_and_ranges(small_zarr):
  batch = _sampler(small_zarr).batch(0)
  assert batch["image"].shape == (2, 4, 32, 32, 1)
  assert batch["target"].shape == (2, 4, 32, 32, 2)
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(np.unique(batch["target"])) <= {0.0, 1.0}


def test_without_augmentation_patch_equals_volume(small_zarr, small_volume):
  sampler = _sampler(small_zarr)
  sampler.augment_config = None
  image = sampler.batch(5)["image"][0, ..., 0]
  vol = small_volume[0].astype(np.float32) / 255
  hits = [(z, y, x) for z in range(vol.shape[0] - 3) for y in range(vol.shape[1] - 31)
          for x in range(vol.shape[2] - 31)
          if np.array_equal(vol[z:z + 4, y:y + 32, x:x + 32], image)]
  assert len(hits) == 1


def test_bad_inputs(tmp_path, small_zarr):
  other = str(tmp_path / "other.zarr")
  sources.write_array(other, np.zeros((4, 8, 8), np.uint32))
  with pytest.raises(UserError, match="must match"):
    PatchSampler(sources.open_volume(small_zarr["image"]), sources.open_volume(other),
                 patch_shape=(2, 4, 4), batch_size=1, seed=0)
  # plain numbers in the message, not numpy reprs such as np.int64(32)
  with pytest.raises(UserError, match=r"larger than the sampled region \[\d+, \d+, \d+\] of"):
    PatchSampler(sources.open_volume(small_zarr["image"]),
                 sources.open_volume(small_zarr["label"]),
                 patch_shape=(64, 32, 32), batch_size=1, seed=0)
  floats = str(tmp_path / "floats.zarr")
  sources.write_array(floats, np.zeros((16, 96, 96), np.float32))
  with pytest.raises(UserError, match="integers"):
    PatchSampler(sources.open_volume(small_zarr["image"]), sources.open_volume(floats),
                 patch_shape=(2, 4, 4), batch_size=1, seed=0)
  empty = str(tmp_path / "empty.zarr")
  sources.write_array(empty, np.zeros((16, 96, 96), np.uint32))
  with pytest.raises(UserError, match="hold no foreground"):
    PatchSampler(sources.open_volume(small_zarr["image"]), sources.open_volume(empty),
                 patch_shape=(4, 32, 32), batch_size=2, seed=0)


def test_foreground_bias_redraws_empty_patches(tmp_path):
  labels = np.zeros((8, 64, 64), np.uint32)
  labels[2:4, 40:44, 10:14] = 1  # one small object in a large empty volume
  image = np.zeros(labels.shape, np.uint8)
  paths = [str(tmp_path / "im.zarr"), str(tmp_path / "lab.zarr")]
  sources.write_array(paths[0], image)
  sources.write_array(paths[1], labels)
  make = lambda bias: PatchSampler(sources.open_volume(paths[0]),
                                   sources.open_volume(paths[1]),
                                   patch_shape=(4, 16, 16), batch_size=4, seed=0,
                                   foreground_bias=bias, foreground_tries=200)
  biased = [make(1.0).batch(s)["target"][..., 0].reshape(4, -1).max(1) for s in range(5)]
  plain = [make(0.0).batch(s)["target"][..., 0].reshape(4, -1).max(1) for s in range(5)]
  assert np.all(np.concatenate(biased) == 1)
  assert np.mean(np.concatenate(plain)) < 0.5


def test_process_shares_make_the_single_process_batch(small_zarr):
  whole = _sampler(small_zarr).batch(7)
  parts = [_sampler(small_zarr, process_index=i, process_count=2).batch(7) for i in range(2)]
  for key in ("image", "target"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(UserError, match="multiple of the 3 processes"):
    _sampler(small_zarr, process_count=3)


def test_every_augmentation_on_keeps_targets_valid(small_zarr):
  from stt_jax.config import AUGMENT_PROBABILITIES, default_config  # pylint: disable=g-import-not-at-top
  cfg = default_config().data.augment
  for key in AUGMENT_PROBABILITIES:
    cfg[key] = 1.0
  sampler = PatchSampler(sources.open_volume(small_zarr["image"]),
                         sources.open_volume(small_zarr["label"]), patch_shape=(4, 32, 32),
                         batch_size=2, seed=0, augment_config=cfg)
  # a corner 16 sqrt(2) / 0.8 from the centre turned onto an axis, less 16, plus
  # 4 x 0.65 / 0.8 of elastic, plus the 8 px shift: 23.5, rounded up
  assert sampler.margin == 24
  for step in range(3):
    batch = sampler.batch(step)
    assert batch["image"].shape == (2, 4, 32, 32, 1) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(np.unique(batch["target"])) <= {0.0, 1.0}
  np.testing.assert_array_equal(sampler.batch(5)["image"], sampler.batch(5)["image"])



def test_misaligned_slices_show_the_tissue_beside_the_patch(small_zarr, small_volume):
  """A misaligned slice is the volume's own window moved by (dy, dx) -- read
  from the margin -- not the patch rolled round onto itself."""
  cfg = ml_collections.ConfigDict(dict(enabled=True, flip_z=False, flip_yx=False,
                                       transpose_xy=False, intensity_prob=0.0,
                                       misalignment_prob=1.0, misalignment_max_shift=8))
  sampler = PatchSampler(sources.open_volume(small_zarr["image"]),
                         sources.open_volume(small_zarr["label"]), patch_shape=(4, 32, 32),
                         batch_size=2, seed=0, augment_config=cfg)
  assert sampler.margin == 8
  vol = small_volume[0].astype(np.float32) / 255
  depth, height, width = vol.shape
  shifted = 0
  for step in range(4):
    for patch in sampler.batch(step)["image"][..., 0]:
      # slice 0 is never shifted: it locates the patch
      (z0, y0, x0), = [(z, y, x) for z in range(depth - 3) for y in range(height - 31)
                       for x in range(width - 31)
                       if np.array_equal(vol[z, y:y + 32, x:x + 32], patch[0])]
      for k in range(1, 4):
        moves = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
                 if 0 <= y0 - dy <= height - 32 and 0 <= x0 - dx <= width - 32
                 and np.array_equal(vol[z0 + k, y0 - dy:y0 - dy + 32, x0 - dx:x0 - dx + 32],
                                    patch[k])]
        if 8 <= y0 <= height - 40 and 8 <= x0 <= width - 40:  # margin fully inside
          assert len(moves) == 1, (step, k)
        shifted += bool(moves) and moves[0] != (0, 0)
  assert shifted > 0


def test_several_volumes_each_give_patches_in_proportion_to_their_voxels(tmp_path):
  """Three labelled cubes of 8 x 32 x 32, 8 x 32 x 64 and a 8 x 32 x 32 region
  of a larger one (voxels 1 : 2 : 1), each of one grey level: the share of
  patches from each is 1/4, 1/2, 1/4 (binomial), and every patch is a crop of
  its own volume, never straddling two."""
  paths = []
  for name, shape, grey in (("a", (8, 32, 32), 40), ("b", (8, 32, 64), 120),
                            ("c", (8, 64, 64), 200)):
    labels = np.zeros(shape, np.uint32)
    labels[:, 4:28, 4:28] = 1
    image, label = str(tmp_path / f"{name}.zarr"), str(tmp_path / f"{name}_lab.zarr")
    sources.write_array(image, np.full(shape, grey, np.uint8))
    sources.write_array(label, labels)
    paths.append((sources.open_volume(image), sources.open_volume(label)))
  region_c = sources.RegionVolume(paths[2][0], (0, 32, 0), (8, 64, 32))
  labels_c = sources.RegionVolume(paths[2][1], (0, 32, 0), (8, 64, 32))
  labels_c_array = labels_c.read([0, 0, 0], labels_c.shape)
  assert not labels_c_array.any()  # c's region holds no object ...
  # ... so the foreground check refuses it, naming that volume
  with pytest.raises(UserError, match="c_lab.zarr.*hold no foreground"):
    PatchSampler(*paths[0], more_volumes=[paths[1], (region_c, labels_c)],
                 patch_shape=(4, 16, 16), batch_size=2, seed=0)
  sampler = PatchSampler(*paths[0], more_volumes=[paths[1], (region_c, labels_c)],
                         patch_shape=(4, 16, 16), batch_size=4, seed=0, check_foreground=False)
  greys = np.concatenate([sampler.batch(step)["image"][:, :, :, :, 0] for step in range(150)])
  levels = np.round(greys.reshape(len(greys), -1) * 255).astype(int)
  assert np.all(levels.min(1) == levels.max(1))  # one grey level: one volume each
  counts = {g: int(np.sum(levels[:, 0] == g)) for g in (40, 120, 200)}
  n = len(levels)  # 600 patches: sd of a 1/4 share is 0.018, of 1/2 0.020
  assert abs(counts[40] / n - 0.25) < 0.07 and abs(counts[200] / n - 0.25) < 0.07
  assert abs(counts[120] / n - 0.5) < 0.08 and sum(counts.values()) == n


def test_more_volumes_are_opened_and_checked_like_the_training_pair(tmp_path, small_zarr):
  from stt_jax.config import default_config, validate  # pylint: disable=g-import-not-at-top
  from stt_jax.data import datasets  # pylint: disable=g-import-not-at-top
  cfg = default_config()
  other = str(tmp_path / "other.zarr")
  sources.write_array(other, np.zeros((4, 8, 8), np.uint32))
  cfg.data.train.more_volumes = ((small_zarr["image"], small_zarr["label"],
                                  ((0, 0, 0), (8, 96, 96))),)
  (image, labels), = datasets.open_more_volumes(cfg, "train")
  assert image.shape == labels.shape == (8, 96, 96)
  for entry, needle in [((small_zarr["image"], other), r"more_volumes\[0\]: image .* must match"),
                        ((small_zarr["image"], str(tmp_path / "none.zarr")),
                         r"more_volumes\[0\].label: volume not found"),
                        ((small_zarr["image"], small_zarr["label"], ((0, 0, 0), (99, 9, 9))),
                         r"more_volumes\[0\].region: .*not inside")]:
    cfg.data.train.more_volumes = (entry,)
    with pytest.raises(UserError, match=needle):
      datasets.open_more_volumes(cfg, "train")
  cfg.data.train.more_volumes = (small_zarr["image"], small_zarr["label"])
  with pytest.raises(UserError, match="entry 0 must be .*trailing comma"):
    validate(cfg)


def test_unlabelled_voxels_get_no_target_and_no_weight(tmp_path, small_zarr, small_volume):
  """data.unlabelled_id: "valid" is 0 on that id (and its target reach),
  the targets treat it as background, and labels holding nothing else are
  refused like empty ones. Checked against the volume, without augmentation
  so that each patch is found where it was cut."""
  image, labels = small_volume
  partial = labels.copy()
  partial[:, :, 48:] = 999  # the right half not annotated
  path = sources.write_array(str(tmp_path / "partial.zarr"), partial).path
  sampler = PatchSampler(sources.open_volume(small_zarr["image"]), sources.open_volume(path),
                         patch_shape=(4, 32, 32), batch_size=4, seed=1, unlabelled_id=999,
                         contour_width=2)
  volume = image.astype(np.float32) / 255
  seen_unlabelled = 0
  for step in range(4):
    batch = sampler.batch(step)
    assert batch["valid"].shape == (4, 4, 32, 32, 1)
    for row in range(4):
      cut = batch["image"][row, ..., 0]
      (z, y, x), = [(z, y, x) for z in range(volume.shape[0] - 3)
                    for y in range(volume.shape[1] - 31) for x in range(volume.shape[2] - 31)
                    if np.array_equal(volume[z:z + 4, y:y + 32, x:x + 32], cut)]
      patch = partial[z:z + 4, y:y + 32, x:x + 32]
      valid = batch["valid"][row, ..., 0]
      assert np.all(valid[patch == 999] == 0)
      # two columns beyond the unlabelled edge (contour_width) are unweighted too
      edge = max(48 - x, 0)
      if 0 < edge <= 32:
        assert np.all(valid[:, :, max(edge - 2, 0):] == 0) and np.all(valid[:, :, :max(edge - 2, 0)] == 1)
      elif edge > 32 + 2:
        assert np.all(valid == 1)
      assert np.all(batch["target"][row, ..., 0][patch == 999] == 0)
      seen_unlabelled += int((patch == 999).any())
  assert seen_unlabelled > 0
  plain = _sampler(small_zarr).batch(0)
  assert "valid" not in plain
  only_unlabelled = sources.write_array(str(tmp_path / "none.zarr"),
                                        np.where(labels > 0, 999, 0).astype(np.uint32)).path
  with pytest.raises(UserError, match="hold no foreground"):
    PatchSampler(sources.open_volume(small_zarr["image"]), sources.open_volume(only_unlabelled),
                 patch_shape=(4, 32, 32), batch_size=1, seed=0, unlabelled_id=999)
