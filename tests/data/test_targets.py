"""Targets against per-voxel loops written straight from the definitions."""

import numpy as np

from stt_jax.data import targets


def _window(a, z, y, x, r):
  return a[z, max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]


def test_contour_and_separation_match_loops():
  rng = np.random.default_rng(0)
  labels = np.zeros((3, 14, 15), np.uint32)
  for i in range(1, 6):
    z, y, x = rng.integers(0, [3, 10, 10])
    labels[z:z + 2, y:y + 5, x:x + 6] = i
  contour = targets.instance_contour(labels, width=2)
  separated = targets.separate_touching(labels)
  for z, y, x in np.ndindex(labels.shape):
    me = labels[z, y, x]
    z_other = any(0 <= n < labels.shape[0] and labels[n, y, x] not in (0, me)
                  for n in (z - 1, z + 1))
    win = _window(labels, z, y, x, 2)
    in_plane = win.max() > 0 and win.min() != win.max()
    assert contour[z, y, x] == int(in_plane or (me > 0 and z_other))
    ids = set(np.unique(_window(labels, z, y, x, 1))) - {0}
    expected = 0 if (me and (len(ids) > 1 or z_other)) else me
    assert separated[z, y, x] == expected


def test_instances_stacked_in_z_get_a_boundary_but_object_faces_do_not():
  labels = np.zeros((4, 9, 9), np.uint32)
  labels[0:2, 2:7, 2:7] = 1
  labels[2:4, 2:7, 2:7] = 2
  t = targets.make_targets(labels, contour_width=1)
  assert t[1, 4, 4, 1] == 1 and t[2, 4, 4, 1] == 1     # 1|2 contact in z
  assert t[1, 4, 4, 0] == 0 and t[2, 4, 4, 0] == 0     # cut from the mask
  assert t[0, 4, 4, 1] == 0 and t[0, 4, 4, 0] == 1     # top face: not contour


def test_make_targets_channels():
  labels = np.zeros((1, 9, 9), np.uint32)
  labels[0, 2:7, 2:4] = 1
  labels[0, 2:7, 4:7] = 2
  t = targets.make_targets(labels, contour_width=1)
  assert t.shape == (1, 9, 9, 2) and t.dtype == np.float32
  assert t[0, 4, 3, 0] == 0 and t[0, 4, 4, 0] == 0  # touching columns cut
  assert t[0, 4, 2, 0] == 1 and t[0, 4, 5, 0] == 1
  assert t[0, 4, 3, 1] == 1 and t[0, 0, 0, 1] == 0


def _brute_force_distance(separated, voxel_size):
  """For each foreground voxel, the smallest physical distance to a voxel
  outside its instance, over all voxels of the patch; / the instance's max."""
  coords = np.stack(np.meshgrid(*[np.arange(n) for n in separated.shape], indexing="ij"),
                    -1).reshape(-1, 3) * np.asarray(voxel_size, float)
  flat = separated.reshape(-1)
  outside = coords[flat == 0]
  out = np.zeros(flat.shape, float)
  for i in np.flatnonzero(flat):
    out[i] = np.sqrt(((outside - coords[i]) ** 2).sum(1)).min()
  for label in np.unique(flat[flat > 0]):
    out[flat == label] /= out[flat == label].max()
  return out.reshape(separated.shape)


def test_normalized_distance_matches_brute_force_anisotropic():
  rng = np.random.default_rng(0)
  labels = np.zeros((5, 14, 16), np.uint32)
  labels[1:4, 2:9, 2:7] = 1          # touches instance 2: they get parted
  labels[0:5, 3:12, 7:14] = 2
  labels[2:4, 11:13, 1:4] = 3        # small
  labels[rng.random(labels.shape) < 0.02] = 0  # holes
  voxel_size = (40.0, 5.0, 5.0)
  t = targets.make_targets(labels, contour_width=1, distance_voxel_size=voxel_size)
  assert t.shape == (*labels.shape, 3) and t.dtype == np.float32
  separated = targets.separate_touching(labels)
  want = _brute_force_distance(separated, voxel_size)
  np.testing.assert_allclose(t[..., 2], want, atol=1e-6)
  for label in (1, 2, 3):
    assert np.isclose(t[..., 2][separated == label].max(), 1.0)
  assert (t[..., 2][separated == 0] == 0).all()
  np.testing.assert_array_equal(t[..., :2], targets.make_targets(labels, contour_width=1))


def test_annotated_mask_drops_unlabelled_voxels_and_their_target_reach():
  """0 exactly where an unlabelled voxel lies within one section and the
  contour's in-plane window (brute force over every voxel)."""
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, (4, 12, 13)).astype(np.uint32)
  labels[rng.random(labels.shape) < 0.03] = 9
  for width in (1, 2):
    mask = targets.annotated_mask(labels, 9, width)
    expected = np.ones(labels.shape, np.float32)
    for z, y, x in np.ndindex(*labels.shape):
      near = labels[max(z - 1, 0):z + 2, max(y - width, 0):y + width + 1,
                    max(x - width, 0):x + width + 1]
      expected[z, y, x] = 0.0 if (near == 9).any() else 1.0
    np.testing.assert_array_equal(mask, expected)
  assert targets.annotated_mask(labels, 7, 2).min() == 1.0  # an id not present
