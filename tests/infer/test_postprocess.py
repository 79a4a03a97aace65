import numpy as np

from stt_jax.infer.postprocess import decode_instances
from stt_jax.metrics.instance_ap import average_precision


def _balls():
  zz, yy, xx = np.mgrid[0:12, 0:40, 0:60]
  labels = np.zeros(zz.shape, np.uint32)
  for i, (cz, cy, cx, r) in enumerate([(6, 20, 17, 8), (6, 20, 32, 8), (6, 8, 50, 5)], 1):
    inside = ((zz - cz) * 2.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    labels[inside & (labels == 0)] = i
  return labels


def test_touching_objects_are_split_and_recovered():
  labels = _balls()
  mask = (labels > 0).astype(float)
  from stt_jax.data.targets import instance_contour
  contour = instance_contour(labels, 1).astype(float) * (labels > 0)
  out = decode_instances(mask * 0.98, contour, min_size=20, min_seed_size=4)
  assert out.dtype == np.uint32 and out.max() == 3
  assert average_precision(labels, out)["ap_75"] == 1.0


def test_small_objects_are_removed():
  mask = np.zeros((4, 20, 20))
  mask[1:3, 2:8, 2:8] = 1.0      # 72 voxels
  mask[1:2, 14:16, 14:16] = 1.0  # 4 voxels
  out = decode_instances(mask, np.zeros_like(mask), min_size=10, min_seed_size=1)
  assert out.max() == 1 and out[1, 15, 15] == 0 and out[1, 4, 4] == 1


def test_objects_of_low_mean_mask_are_removed():
  """decode.min_mean_mask: an object whose mean mask probability (uint8
  levels / 255, over its voxels) is below the cut goes, whatever its size;
  the mean is checked against numpy's over the decoded object."""
  mask = np.zeros((4, 20, 30))
  mask[1:3, 2:8, 2:8] = 0.99     # confident
  mask[1:3, 2:8, 12:18] = 0.95   # its seed core, in a dimmer rim
  mask[1:3, 3:7, 13:17] = 0.97
  mask[1:3, 12:18, 22:28] = 0.93
  contour = np.zeros_like(mask)
  kept_all = decode_instances(mask, contour, min_size=10, min_seed_size=1, seed_mask=0.92)
  assert kept_all.max() == 3
  u8 = np.round(mask * 255)
  means = {i: u8[kept_all == i].mean() / 255 for i in (1, 2, 3)}
  cut = (sorted(means.values())[0] + sorted(means.values())[1]) / 2  # between the lowest two
  out = decode_instances(mask, contour, min_size=10, min_seed_size=1, seed_mask=0.92,
                         min_mean_mask=cut)
  kept = {i for i, m in means.items() if m >= cut}
  assert out.max() == len(kept) == 2
  assert np.array_equal(out > 0, np.isin(kept_all, list(kept)))
  assert decode_instances(mask, contour, min_size=10, min_seed_size=1, seed_mask=0.92,
                          min_mean_mask=1.0).max() == 0
