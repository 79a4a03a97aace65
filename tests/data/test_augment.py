"""Augmentations: labels stay aligned with the image after each geometric
transform, which samples the real tissue of the read's margin (not mirrored
or wrapped content); image-only defects leave labels alone and stay in
[0, 1]. Geometry is checked against scipy on the read, not against itself."""

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from stt_jax.data import augment

SHAPE = (6, 48, 40)       # the patch
MARGIN = 12               # read beyond each in-plane side
READ = (SHAPE[0], SHAPE[1] + 2 * MARGIN, SHAPE[2] + 2 * MARGIN)
OFFSET = (MARGIN, MARGIN)

# every geometric transform, each alone and all together
TRANSFORMS = {
    "rescale": dict(scale_range=(0.8, 1.2)),
    "elastic": dict(elastic=(16.0, 4.0)),
    "rotation": dict(rotation_range=(0.0, 360.0)),
    "misalignment": dict(misalignment_shift=8),
    "all": dict(scale_range=(0.8, 1.2), rotation_range=(0.0, 360.0), elastic=(16.0, 4.0),
                misalignment_shift=8),
}


def _ramp_pair(shape=READ):
  """A smooth image and labels that are a function of it (bands of the ramp),
  so alignment can be checked voxel by voxel: label == band(image)."""
  _, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
  image = (0.6 * y / shape[1] + 0.4 * x / shape[2]).astype(np.float32)
  labels = np.floor(image * 8).astype(np.uint32) + 1
  return image, labels


def _agreement(image, labels):
  return np.mean(np.floor(image * 8).astype(np.uint32) + 1 == labels)


def _warp(image, labels, seed, **kw):
  return augment.warp_crop(image, labels, np.random.default_rng(seed),
                           out_height_width=SHAPE[1:], offset=OFFSET, **kw)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_geometric_transforms_move_labels_with_the_image(name):
  image, labels = _ramp_pair()
  assert _agreement(image, labels) == 1.0
  crop = labels[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
  moved_any = False
  for seed in range(4):
    out_image, out_labels = _warp(image, labels, seed, **TRANSFORMS[name])
    assert out_image.shape == SHAPE and out_labels.shape == SHAPE
    assert out_labels.dtype == labels.dtype
    assert set(np.unique(out_labels)) <= set(np.unique(labels))  # ids, not blends
    # bilinear image vs nearest labels differ only on band edges
    assert _agreement(out_image, out_labels) > 0.9, (name, seed)
    moved_any |= not np.array_equal(out_labels, crop)
  assert moved_any
  # the check has teeth: labels moved without the image fail it
  assert _agreement(image, np.roll(labels, 6, axis=2)) < 0.9
  # flips/transpose (on the patch) move both alike too
  image_crop = image[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
  for seed in range(4):
    flipped = augment.flip_transpose(image_crop, crop, np.random.default_rng(seed))
    assert flipped[0].shape == SHAPE and _agreement(*flipped) == 1.0


def test_no_transform_is_the_patch_of_the_read():
  rng = np.random.default_rng(0)
  image = rng.random(READ).astype(np.float32)
  labels = rng.integers(0, 9, READ).astype(np.uint32)
  out_image, out_labels = _warp(image, labels, 0)
  np.testing.assert_array_equal(out_image, image[:, MARGIN:-MARGIN, MARGIN:-MARGIN])
  np.testing.assert_array_equal(out_labels, labels[:, MARGIN:-MARGIN, MARGIN:-MARGIN])


def test_zoom_out_reads_the_margin_not_a_mirror():
  """Zoom by s about the patch centre: the output at p is the read at
  centre + (p - centre) / s; at s = 0.8 the patch's edges map into the margin,
  so the result matches scipy on the read (a mirror of the patch would not)."""
  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.random(READ), (0, 2, 2)).astype(np.float32)
  labels = np.zeros(READ, np.uint32)
  out_image, _ = _warp(image, labels, 5, scale_range=(0.8, 0.8))
  h, w = SHAPE[1:]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  grid = [cy + (yy - cy) / 0.8 + MARGIN, cx + (xx - cx) / 0.8 + MARGIN]
  assert grid[0].min() < MARGIN and grid[0].max() > MARGIN + h - 1  # beyond the patch
  expected = ndimage.map_coordinates(image[2], grid, order=1)
  np.testing.assert_allclose(out_image[2], expected, atol=1e-6)


def test_elastic_moves_pixels_as_much_as_smoothed_white_noise():
  """The displacement's spread is alpha * std(U(-1, 1)) / (2 sqrt(pi) sigma),
  the spread of uniform noise after a 2D Gaussian of sigma pixels: 0.65 px
  RMS at alpha 16, sigma 4 (pytorch_connectomics' field). Read off a ramp
  image, whose bilinear samples are exactly its coordinate."""
  size, margin, alpha, sigma = 256, 8, 16.0, 4.0
  yy, xx = np.meshgrid(np.arange(size + 2 * margin), np.arange(size + 2 * margin),
                       indexing="ij")
  labels = np.zeros((1,) + yy.shape, np.uint32)
  shifts = []
  for ramp in (yy, xx):
    image = ramp[None].astype(np.float64)
    for seed in range(4):
      out, _ = augment.warp_crop(image, labels, np.random.default_rng(seed),
                                 out_height_width=(size, size), offset=(margin, margin),
                                 elastic=(alpha, sigma))
      shifts.append(out[0] - image[0, margin:-margin, margin:-margin])
  rms = float(np.sqrt(np.mean(np.square(shifts))))
  expected = 0.6514700158705599   # 16 * sqrt(1/3) / (2 sqrt(pi) 4), by hand
  assert rms == pytest.approx(expected, rel=0.15)
  assert augment.elastic_rms(alpha, sigma) == pytest.approx(expected, rel=1e-9)
  # a field rescaled to reach alpha (the old bug) would be ~10x this
  assert np.abs(shifts).max() < alpha / 4


def test_misalignment_shifts_both_by_the_same_offset_from_the_margin():
  """Shifted slices show what lay beside the patch in the read (np.roll of the
  patch would wrap its opposite edge in)."""
  rng = np.random.default_rng(0)
  image = rng.random(READ).astype(np.float32)
  labels = rng.integers(0, 5, READ).astype(np.uint32)
  h, w = SHAPE[1:]
  shifted_slices = 0
  for seed in range(6):
    out_image, out_labels = _warp(image, labels, seed, misalignment_shift=8)
    for z in range(SHAPE[0]):
      found = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
               if np.array_equal(image[z, MARGIN - dy:MARGIN - dy + h,
                                       MARGIN - dx:MARGIN - dx + w], out_image[z])]
      assert len(found) == 1, (seed, z)
      dy, dx = found[0]
      np.testing.assert_array_equal(
          labels[z, MARGIN - dy:MARGIN - dy + h, MARGIN - dx:MARGIN - dx + w], out_labels[z])
      shifted_slices += (dy, dx) != (0, 0)
  assert shifted_slices > 0


def test_rotation_is_scipy_rotate_of_the_read():
  """A rotation about the patch centre equals scipy's `ndimage.rotate` of the
  whole read (same centre, since the margins are equal), cropped to the patch:
  the patch's corners turn into the margin, so that is tissue, not a mirror."""
  margin = 20                      # > 24 * sqrt(2) - 24 = 9.9 for the 48^2 patch
  rng = np.random.default_rng(0)
  read = ndimage.gaussian_filter(rng.random((2, 48 + 2 * margin, 48 + 2 * margin)),
                                 (0, 2, 2))
  ids = rng.integers(1, 50, read.shape).astype(np.uint32)
  for angle in (30.0, 137.0, -75.0):
    out_image, out_labels = augment.warp_crop(
        read, ids, np.random.default_rng(1), out_height_width=(48, 48),
        offset=(margin, margin), rotation_range=(angle, angle))
    crop = (slice(margin, margin + 48),) * 2
    for z in range(2):
      expected = ndimage.rotate(read[z], angle, reshape=False, order=1)[crop]
      np.testing.assert_allclose(out_image[z], expected, atol=1e-9)
      expected_ids = ndimage.rotate(ids[z], angle, reshape=False, order=0)[crop]
      # nearest neighbour may round a coordinate at exactly .5 differently
      assert np.mean(out_labels[z] == expected_ids) > 0.999, angle
    # the opposite sense of rotation would not match
    wrong = ndimage.rotate(read[0], -angle, reshape=False, order=1)[crop]
    assert np.abs(out_image[0] - wrong).max() > 0.05


def test_margin_covers_what_the_transforms_can_reach():
  cfg = ml_collections.ConfigDict(dict(
      enabled=True, rescale_prob=0.5, rescale_range=(0.8, 1.2), rotate_prob=0.0,
      elastic_prob=0.5, elastic_alpha=16.0, elastic_sigma=4.0, misalignment_prob=0.5,
      misalignment_max_shift=8))
  # 128 * (1/0.8 - 1) = 32, 4 x 0.651 / 0.8 = 3.3, 8: 43.3 -> 44
  assert augment.in_plane_margin(cfg, (256, 256)) == 44
  cfg.rotate_prob = 0.5
  # a corner 128 sqrt(2) from the centre, zoomed out by 1/0.8, onto an axis:
  # 226.3 - 128 = 98.3, + 3.3 + 8 -> 110
  assert augment.in_plane_margin(cfg, (256, 256)) == 110
  cfg.rotate_prob = cfg.elastic_prob = cfg.misalignment_prob = 0.0
  assert augment.in_plane_margin(cfg, (256, 256)) == 32
  cfg.rescale_range = (1.0, 1.2)   # magnification reads inside the patch
  assert augment.in_plane_margin(cfg, (256, 256)) == 0
  cfg.enabled = False
  assert augment.in_plane_margin(cfg, (256, 256)) == 0
  assert augment.in_plane_margin(None, (256, 256)) == 0


@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (96, 40)])
def test_the_worst_draws_stay_inside_the_margin(shape):
  """Strongest zoom-out, every angle (0.5 degree steps), shifts and elastic
  fields: every sampled coordinate lies within the read `in_plane_margin`
  asks for; zoom and rotation alone come within 2 px of the room the margin
  leaves for the elastic field and the shift (it is not wastefully wide)."""
  cfg = ml_collections.ConfigDict(dict(
      enabled=True, rescale_prob=0.5, rescale_range=(0.8, 1.2), rotate_prob=0.5,
      elastic_prob=0.5, elastic_alpha=16.0, elastic_sigma=4.0, misalignment_prob=0.5,
      misalignment_max_shift=8))
  margin = augment.in_plane_margin(cfg, shape)
  h, w = shape

  def overshoot(**kw):
    worst = -np.inf
    for angle in np.arange(0.0, 360.0, 0.5):
      for seed in range(2):
        ys, xs = augment.sampling_grid(4, h, w, np.random.default_rng(seed),
                                       scale_range=(0.8, 0.8),
                                       rotation_range=(angle, angle), **kw)
        # the last read pixel is at h - 1 + margin (patch coordinates)
        worst = max(worst, -ys.min() - margin, ys.max() - (h - 1 + margin),
                    -xs.min() - margin, xs.max() - (w - 1 + margin))
    return worst

  room = 4 * augment.elastic_rms(16.0, 4.0) / 0.8 + 8   # left for elastic + shift
  assert -room - 2.0 < overshoot() <= -room + 1.0
  assert overshoot(misalignment_shift=8, elastic=(16.0, 4.0)) <= 0.0


@pytest.mark.parametrize("name", ["missing_section", "motion_blur", "cut_blur", "cut_noise",
                                  "intensity"])
def test_image_only_defects(name):
  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.random(SHAPE), 2).astype(np.float32)
  out = getattr(augment, name)(image, np.random.default_rng(1))
  assert out.shape == SHAPE and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  assert not np.array_equal(out, image)
  if name == "missing_section":
    changed = [z for z in range(SHAPE[0]) if not np.array_equal(out[z], image[z])]
    assert len(changed) == 1 and np.ptp(out[changed[0]]) == 0
  if name == "motion_blur":
    changed = [z for z in range(SHAPE[0]) if not np.array_equal(out[z], image[z])]
    assert len(changed) == 1 and out[changed[0]].std() < image[changed[0]].std()


def test_intensity_factors_move_by_half_their_value():
  """contrast/brightness f: x(1 +- f/2) and +-f/2 grey (ELEKTRONN/PyTC), checked
  one factor at a time over many draws."""
  image = np.full((1, 4, 4), 0.5, np.float32)
  rng = np.random.default_rng(0)
  gains = [augment.intensity(image, rng, contrast=0.3, brightness=0.0, gamma_log2=0.0)[0, 0, 0]
           / 0.5 for _ in range(400)]
  assert 0.85 - 1e-6 <= min(gains) < 0.87 and 1.13 < max(gains) <= 1.15 + 1e-6
  offsets = [augment.intensity(image, rng, contrast=0.0, brightness=0.3, gamma_log2=0.0)[0, 0, 0]
             - 0.5 for _ in range(400)]
  assert -0.15 - 1e-6 <= min(offsets) < -0.13 and 0.13 < max(offsets) <= 0.15 + 1e-6
