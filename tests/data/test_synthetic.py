import numpy as np
from scipy import ndimage

from stt_jax.data import synthetic
from tests.conftest import SMALL_SPEC


def test_deterministic_by_seed(small_volume):
  image, labels = synthetic.generate(SMALL_SPEC, seed=3)
  np.testing.assert_array_equal(image, small_volume[0])
  np.testing.assert_array_equal(labels, small_volume[1])
  other_image, _ = synthetic.generate(SMALL_SPEC, seed=4)
  assert not np.array_equal(image, other_image)


def test_dtypes_shapes_and_sequential_ids(small_volume):
  image, labels = small_volume
  assert image.dtype == np.uint8 and labels.dtype == np.uint32
  assert image.shape == labels.shape == SMALL_SPEC.shape
  ids = np.unique(labels)
  np.testing.assert_array_equal(ids, np.arange(len(ids)))
  assert len(ids) > 5
  assert 0.02 < np.mean(labels > 0) < 0.4


def test_image_agrees_with_labels(small_volume):
  image, labels = small_volume
  img = image.astype(float)
  mito = labels > 0
  inner_rim = mito & ~ndimage.binary_erosion(mito, np.ones((1, 3, 3)))
  interior = ndimage.binary_erosion(mito, np.ones((1, 7, 7)))
  # the dark double membrane sits on each labelled object's border
  assert img[inner_rim].mean() < img[~mito].mean() - 40
  assert img[inner_rim].mean() < img[interior].mean() - 10
  # the matrix is darker than cytoplasm on average
  assert img[interior].mean() < img[~mito].mean()


def test_touching_instances_exist():
  _, labels = synthetic.generate(synthetic.SyntheticSpec(shape=(16, 128, 128)), 0)
  grown = ndimage.grey_dilation(labels, size=(1, 3, 3))
  touching = (labels > 0) & (grown != labels) & (grown > 0)
  assert touching.any()


def test_anisotropy_makes_objects_span_fewer_sections():
  spec = synthetic.SyntheticSpec(shape=(24, 96, 96), num_mitochondria=12,
                                 num_vesicles=0, num_dark_blobs=0,
                                 missing_section_prob=0, blurred_section_prob=0)
  fine = synthetic.generate(dataclass_replace(spec, anisotropy=1.0), 0)[1]
  coarse = synthetic.generate(dataclass_replace(spec, anisotropy=4.0), 0)[1]
  extent = lambda lab: np.mean([np.ptp(np.nonzero(lab == i)[0]) + 1
                                for i in range(1, lab.max() + 1)])
  assert extent(coarse) < extent(fine)


def dataclass_replace(spec, **kw):
  import dataclasses
  return dataclasses.replace(spec, **kw)
