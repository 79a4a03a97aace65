"""model.input_scale: training reads binned patches, validation predicts on the
binned image and scores at the labels' voxels (scores against numpy)."""

import os
import sys

import jax
import numpy as np

from stt_jax import config as config_lib
from stt_jax.data import rescaled, sources
from stt_jax.infer import sliding_window
from stt_jax.train import loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_loop  # noqa: E402  pylint: disable=wrong-import-position
import test_validate  # noqa: E402  pylint: disable=wrong-import-position


def _read_all(path):
  volume = sources.open_volume(path)
  return volume.read([0] * len(volume.shape), volume.shape), volume


def test_validation_predicts_binned_and_scores_at_the_label_voxels(tmp_path):
  image, label_path, labels = test_validate._volumes(tmp_path)
  cfg = test_validate._tiny_cfg(image, label_path, region=((3, 0, 0), (6, 32, 32)))
  cfg.model.input_scale = (1, 2, 2)
  cfg.data.patch_shape = (4, 16, 16)
  cfg.infer.update(window=(4, 16, 16), block_shape=(8, 16, 16))
  cfg.data.val.context = (2, 5, 5)
  config_lib.validate(cfg)
  setup = loop.build(cfg, jax.devices()[:1])
  predict_fn = sliding_window.make_predict_fn(setup.model, setup.mesh)
  scores, _, out = loop.validate(cfg, str(tmp_path / "val"), predict_fn,
                                 setup.state.inference_params(), setup.mesh)
  probs, pvol = _read_all(f"{out}/probabilities.zarr")
  instances, _ = _read_all(f"{out}/instances.zarr")
  assert probs.shape == (7, 16, 16, 2) and instances.shape == (7, 32, 32)
  assert pvol.voxel_size_nm == tuple(v * f for v, f in zip(cfg.data.voxel_size_nm, (1, 2, 2)))
  region = instances[2:5] > 0
  assert region.any()
  gt = labels[3:6] > 0
  inter, union = np.sum(gt & region), np.sum(gt | region)
  assert abs(scores["jaccard"] - inter / union) < 1e-9
  assert scores["volume_shape"] == [3, 32, 32]
  # the objects' confidence sweep reads the probabilities at the instances' voxels
  assert scores["object_mean_mask_sweep"]


def test_training_binned_trains_and_validates_at_full_resolution(tmp_path):
  cfg = test_loop._cfg(**{"model.input_scale": (1, 2, 2), "train.steps": 2, "train.eval_every": 2,
                          "data.patch_shape": (4, 16, 16), "infer.window": (4, 16, 16),
                          "loss.adversarial_weight": 0.0, "train.ema_decay": 0.0,
                          "decode.min_size": 2, "eval.min_gt_size": 4})
  result = loop.train(cfg, str(tmp_path / "run"), quiet=True)
  assert int(result.state.step) == 2
  scores = result.final_validation[0]
  val_shape = list(cfg.data.synthetic.val_shape)
  assert scores["volume_shape"] == val_shape
  out = str(tmp_path / "run" / "val_segmentation")
  instances, _ = _read_all(f"{out}/instances.zarr")
  probs, _ = _read_all(f"{out}/probabilities.zarr")
  assert list(instances.shape) == val_shape
  assert list(probs.shape[:3]) == [val_shape[0], val_shape[1] // 2, val_shape[2] // 2]


def test_the_sampler_reads_means_and_modes(tmp_path):
  cfg = test_loop._cfg(**{"model.input_scale": (1, 2, 2), "data.patch_shape": (4, 16, 16),
                          "infer.window": (4, 16, 16)})
  from stt_jax.data import datasets  # pylint: disable=g-import-not-at-top
  datasets.ensure_synthetic(cfg, str(tmp_path))
  sampler = loop._sampler(cfg)
  pair = sampler._pairs[0]
  assert isinstance(pair.image, rescaled.BinnedVolume) and pair.image.reduce == "mean"
  assert isinstance(pair.labels, rescaled.BinnedVolume) and pair.labels.reduce == "mode"
  image, _ = _read_all(cfg.data.train.image)
  z, y, x = image.shape
  want = np.rint(image.reshape(z, y // 2, 2, x // 2, 2).mean(axis=(2, 4)))
  np.testing.assert_array_equal(pair.image.read([0, 0, 0], pair.image.shape), want)
  assert sampler.batch(0)["image"].shape[1:4] == (4, 16, 16)
