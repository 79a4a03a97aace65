"""stt_jax/data/datasets.py: what the data section is checked for before a
run touches its workdir, so a bad volume is one line and no run folder."""

import os

import numpy as np
import pytest

from stt_jax import config as config_lib
from stt_jax.config import default_config
from stt_jax.data import datasets, sources
from stt_jax.errors import UserError
from stt_jax.train import loop


def _labels():
  labels = np.zeros((8, 64, 64), np.uint32)
  labels[2:6, 10:40, 10:40] = 1
  labels[2:6, 45:60, 45:60] = 2
  return labels


def _cfg(tmp_path, image, labels, val_labels=None):
  cfg = default_config()
  cfg.model.widths = (4, 4, 6, 6, 8)
  cfg.data.patch_shape = (4, 32, 32)
  cfg.train.steps = 1
  write = lambda name, a: sources.write_array(str(tmp_path / name), a).path
  image_path, label_path = write("image.zarr", image), write("labels.zarr", labels)
  cfg.data.train.update(image=image_path, label=label_path)
  cfg.data.val.update(image=image_path, label=label_path if val_labels is None
                      else write("val_labels.zarr", val_labels))
  return cfg


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_an_image_that_is_not_uint8_is_refused(tmp_path, dtype):
  # the model reads u / 255: 16-bit values would reach 257, floats in [0, 1] ~0
  image = np.full((8, 64, 64), 100, dtype)
  cfg = _cfg(tmp_path, image, _labels())
  with pytest.raises(UserError, match=f"config.data.train.image: image .*image.zarr has "
                                      f"dtype {np.dtype(dtype).name}; .*rescale it once with --mode=convert"):
    datasets.open_split(cfg, "train")


def test_an_image_with_channels_is_refused(tmp_path):
  cfg = _cfg(tmp_path, np.zeros((8, 64, 64, 2), np.uint8), _labels())
  with pytest.raises(UserError, match=r"has shape \(8, 64, 64, 2\); it must be 3D"):
    datasets.check_image(sources.open_volume(cfg.data.train.image), "config.data.train.image")


def test_float_validation_labels_are_refused_unless_they_are_masks(tmp_path):
  image = np.zeros((8, 64, 64), np.uint8)
  cfg = _cfg(tmp_path, image, _labels(), val_labels=_labels().astype(np.float32))
  with pytest.raises(UserError, match="config.data.val.label: .*float32; instance labels "
                                      "must be integers .*label_kind=mask"):
    datasets.open_split(cfg, "val")
  cfg.data.label_kind = "mask"  # a float mask is thresholded: read as instances
  _, labels = datasets.open_split(cfg, "val")
  assert labels.dtype == np.uint32


@pytest.mark.parametrize("case", ["float_train_labels", "float_val_labels", "patch_too_large"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, case):
  """Each is refused before the workdir is made, so the run can be started
  again as it was, without --overwrite."""
  image, labels = np.zeros((8, 64, 64), np.uint8), _labels()
  if case == "float_train_labels":
    cfg = _cfg(tmp_path, image, labels.astype(np.float32), val_labels=labels)
  elif case == "float_val_labels":
    cfg = _cfg(tmp_path, image, labels, val_labels=labels.astype(np.float32))
  else:
    cfg = _cfg(tmp_path, image, labels)
    cfg.data.patch_shape = (16, 32, 32)
  config_lib.validate(cfg)
  work = str(tmp_path / "run")
  with pytest.raises(UserError):
    loop.train(cfg, work, quiet=True)
  assert not os.path.exists(work)


def test_a_config_that_generates_its_data_refuses_given_volumes():
  cfg = default_config()
  cfg.data.synthetic.enabled = True
  config_lib.validate(cfg)
  cfg.data.val.image = "/my/image.zarr"
  with pytest.raises(UserError, match="config.data.synthetic.enabled: is on, so it would "
                                      "train and score on generated volumes instead of "
                                      "data.val.image; add --config.data.synthetic.enabled"
                                      "=False"):
    config_lib.validate(cfg)


def test_unlabelled_id_is_minus_one_or_an_id_and_needs_instance_labels():
  from stt_jax import config as config_lib
  cfg = config_lib.default_config()
  for bad, message in ((0, "must be -1 .* or a label id >= 1, got 0"),
                       (-5, "must be .*, got -5")):
    cfg.data.unlabelled_id = bad
    with pytest.raises(UserError, match=f"config.data.unlabelled_id: {message}"):
      config_lib.validate(cfg)
  cfg.data.unlabelled_id = 65535
  config_lib.validate(cfg)
  cfg.data.label_kind = "mask"
  with pytest.raises(UserError, match="config.data.unlabelled_id: needs instance labels"):
    config_lib.validate(cfg)


def test_an_unlabelled_id_the_labels_cannot_hold_is_one_line(tmp_path):
  image = sources.write_array(str(tmp_path / "im.zarr"), np.zeros((2, 8, 8), np.uint8)).path
  labels = sources.write_array(str(tmp_path / "lab.zarr"), np.ones((2, 8, 8), np.uint16)).path
  cfg = default_config()
  cfg.data.val.update(image=image, label=labels)
  cfg.data.unlabelled_id = 70000
  with pytest.raises(UserError, match=r"config.data.val.label: .*lab.zarr is uint16, which "
                                      r"cannot hold data.unlabelled_id=70000"):
    datasets.open_split(cfg, "val")
  cfg.data.unlabelled_id = 65535
  datasets.open_split(cfg, "val")
