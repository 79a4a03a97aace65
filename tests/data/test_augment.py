"""Augmentations: labels stay aligned with the image after each geometric
transform; image-only defects leave labels alone and stay in [0, 1]."""

import numpy as np
import pytest
from scipy import ndimage

from stt_jax.data import augment

SHAPE = (6, 48, 40)


def _ramp_pair():
  """A smooth image and labels that are a function of it (bands of the ramp),
  so alignment can be checked voxel by voxel: label == band(image)."""
  z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
  image = (0.6 * y / SHAPE[1] + 0.4 * x / SHAPE[2] + 0.0 * z).astype(np.float32)
  labels = np.floor(image * 8).astype(np.uint32) + 1
  return image, labels


def _agreement(image, labels):
  return np.mean(np.floor(image * 8).astype(np.uint32) + 1 == labels)


@pytest.mark.parametrize("name", ["rescale", "elastic", "misalignment", "flip_transpose"])
def test_geometric_transforms_move_labels_with_the_image(name):
  image, labels = _ramp_pair()
  assert _agreement(image, labels) == 1.0
  moved_any = False
  for seed in range(4):
    rng = np.random.default_rng(seed)
    out_image, out_labels = getattr(augment, name)(image, labels, rng)
    assert out_image.shape == SHAPE and out_labels.dtype == labels.dtype
    assert set(np.unique(out_labels)) <= set(np.unique(labels))  # ids, not blends
    # bilinear image vs nearest labels differ only on band edges
    assert _agreement(out_image, out_labels) > 0.9, (name, seed)
    moved_any |= not np.array_equal(out_labels, labels)
  assert moved_any
  # the check has teeth: labels moved without the image fail it
  assert _agreement(image, np.roll(labels, 6, axis=2)) < 0.9


def test_rescale_and_elastic_against_scipy():
  image, labels = _ramp_pair()
  rng = np.random.default_rng(3)
  scale = np.random.default_rng(3).uniform(0.8, 1.2)
  out_image, _ = augment.rescale(image, labels, rng)
  # zoom about the centre: the centre pixel keeps its value, a pixel d away from
  # it reads the source d / scale away
  h, w = SHAPE[1:]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  src = ndimage.map_coordinates(image[0], [[cy + (5 - cy) / scale], [cx + (7 - cx) / scale]],
                                order=1, mode="mirror")
  assert out_image[0, 5, 7] == pytest.approx(src[0], abs=1e-6)
  # elastic displacements are at most alpha pixels
  out_image, out_labels = augment.elastic(image, labels, np.random.default_rng(1), alpha=3.0)
  assert np.abs(out_image - image).max() <= 3.0 * (0.6 / h + 0.4 / w) * 1.5 + 1e-6


def test_misalignment_shifts_both_by_the_same_offset():
  rng = np.random.default_rng(0)
  image = rng.random(SHAPE).astype(np.float32)
  labels = rng.integers(0, 5, SHAPE).astype(np.uint32)
  for seed in range(6):
    out_image, out_labels = augment.misalignment(image, labels, np.random.default_rng(seed))
    for z in range(SHAPE[0]):
      if np.array_equal(out_image[z], image[z]):
        np.testing.assert_array_equal(out_labels[z], labels[z])
        continue
      found = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
               if np.array_equal(np.roll(image[z], (dy, dx), axis=(0, 1)), out_image[z])]
      assert len(found) == 1
      np.testing.assert_array_equal(np.roll(labels[z], found[0], axis=(0, 1)), out_labels[z])


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
