"""Validation with data.val.context: the region is segmented with the image
around it and scored on the region alone (scores against numpy)."""

import jax
import numpy as np
import pytest

from stt_jax import config as config_lib
from stt_jax.config import default_config
from stt_jax.data import sources
from stt_jax.errors import UserError
from stt_jax.infer import sliding_window
from stt_jax.train import loop


def _volumes(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.zeros((8, 32, 32), np.uint32)
  for i, (z, y, x) in enumerate([(1, 2, 2), (3, 14, 4), (4, 4, 18), (5, 18, 18)], 1):
    labels[z:z + 3, y:y + 9, x:x + 10] = i
  image = np.clip(np.where(labels > 0, 60, 190) + rng.normal(0, 25, labels.shape), 0, 255)
  return (sources.write_array(str(tmp_path / "im.zarr"), image.astype(np.uint8)).path,
          sources.write_array(str(tmp_path / "lab.zarr"), labels).path, labels)


def _jaccard_dice(gt, pred):
  inter, union = np.sum(gt & pred), np.sum(gt | pred)
  return inter / union, 2 * inter / (gt.sum() + pred.sum())


def _tiny_cfg(image, label_path, region=((0, 0, 0), (4, 32, 32))):
  """A tiny model validating on `region` of the volume."""
  cfg = default_config()
  cfg.model.widths = (4, 4, 6, 6, 8)
  cfg.data.patch_shape = (4, 32, 32)
  cfg.data.val.update(image=image, label=label_path, region=region)
  cfg.infer.update(window=(4, 32, 32), overlap=0.5, batch_size=2, block_shape=(8, 32, 32))
  cfg.decode.update(block_shape=(8, 32, 32), halo=(0, 0, 0), min_size=4,
                    foreground=0.45, seed_mask=0.45)
  cfg.eval.min_gt_size = 1
  return cfg


def _read_all(path):
  volume = sources.open_volume(path)
  return volume.read([0] * len(volume.shape), volume.shape)


def test_context_is_predicted_then_only_the_region_scored(tmp_path):
  image, label_path, labels = _volumes(tmp_path)
  cfg = _tiny_cfg(image, label_path, region=((3, 0, 0), (6, 32, 32)))
  setup = loop.build(cfg, jax.devices()[:1])
  predict_fn = sliding_window.make_predict_fn(setup.model, setup.mesh)
  params = setup.state.inference_params()

  def run(context, name):
    cfg.data.val.context = context
    scores, path, out = loop.validate(cfg, str(tmp_path / name), predict_fn, params,
                                      setup.mesh)
    return (scores, path, _read_all(f"{out}/probabilities.zarr"),
            _read_all(f"{out}/instances.zarr"))

  plain, plain_path, plain_probs, _ = run((0, 0, 0), "plain")
  # z: 3 - 2 .. 6 + 2, cut at the volume's 8; y, x: the region is the whole slice, nothing to add
  scores, path, probs, instances = run((2, 5, 5), "context")
  assert probs.shape[:3] == instances.shape == (7, 32, 32) and plain_probs.shape[:3] == (3, 32, 32)
  assert scores["context_offset"] == [2, 0, 0] and scores["volume_shape"] == [3, 32, 32]
  assert "context_offset" not in plain and "data.val.context" not in plain_path
  assert path.endswith("im.zarr[[1, 0, 0]:[8, 32, 32]], scored on [[2, 0, 0]:[5, 32, 32]] "
                       "of it (data.val.context)")
  region = instances[2:5]
  assert region.any() and instances[:2].any() | instances[5:].any()  # context predicted too
  jaccard, dice = _jaccard_dice(labels[3:6] > 0, region > 0)
  assert abs(scores["jaccard"] - jaccard) < 1e-9
  assert abs(scores["dice"] - dice) < 1e-9
  assert scores["num_gt"] == len(np.unique(labels[3:6])) - 1
  # the network sees the real neighbouring sections: the region's maps change
  assert np.abs(probs[2:5].astype(int) - plain_probs.astype(int)).max() > 0


def test_context_must_be_three_sizes_of_at_least_zero():
  for bad in ((1, -1, 0), (2, 2)):
    cfg = default_config()
    cfg.data.val.context = bad
    with pytest.raises(UserError, match=r"data\.val\.context.*needs 3 sizes >= 0"):
      config_lib.validate(cfg)


def test_more_validation_volumes_are_scored_as_one_set(tmp_path):
  image, label_path, labels = _volumes(tmp_path)
  cfg = _tiny_cfg(image, label_path)
  cfg.data.val.context = (1, 0, 0)
  # the other half of the volume, and the whole of a second file
  other = np.roll(labels, 7, axis=2)
  other_image = sources.write_array(
      str(tmp_path / "im2.zarr"),
      np.clip(np.where(other > 0, 70, 180), 0, 255).astype(np.uint8)).path
  other_labels = sources.write_array(str(tmp_path / "lab2.zarr"), other).path
  cfg.data.val.more_volumes = ((image, label_path, ((4, 0, 0), (8, 32, 32))),
                               (other_image, other_labels))
  config_lib.validate(cfg)
  setup = loop.build(cfg, jax.devices()[:1])
  predict_fn = sliding_window.make_predict_fn(setup.model, setup.mesh)
  params = setup.state.inference_params()
  workdir = tmp_path / "run"
  scores, path, out = loop.validate(cfg, str(workdir), predict_fn, params, setup.mesh)
  outputs = [out, str(workdir / "val_segmentation_more0"), str(workdir / "val_segmentation_more1")]
  assert [v["output"] for v in scores["per_volume"]] == outputs
  # context: z 0..4 grows to 0..5, 4..8 to 3..8; the second file has no region
  predicted = [_read_all(f"{outputs[0]}/instances.zarr")[0:4],
               _read_all(f"{outputs[1]}/instances.zarr")[1:5],
               _read_all(f"{outputs[2]}/instances.zarr")]
  truth = [labels[0:4], labels[4:8], other]
  assert [v["volume_shape"] for v in scores["per_volume"]] == [[4, 32, 32]] * 2 + [[8, 32, 32]]
  assert scores["per_volume"][1]["context_offset"] == [1, 0, 0]
  assert "context_offset" not in scores["per_volume"][2]
  assert path == scores["per_volume"][0]["volume"]
  gt = np.concatenate([t > 0 for t in truth])
  pred = np.concatenate([p > 0 for p in predicted])
  assert pred.any()
  jaccard, dice = _jaccard_dice(gt, pred)
  assert abs(scores["jaccard"] - jaccard) < 1e-9 and abs(scores["dice"] - dice) < 1e-9
  assert scores["num_gt"] == sum(len(np.unique(t)) - 1 for t in truth)
  for volume, t, p in zip(scores["per_volume"], truth, predicted):
    j, _ = _jaccard_dice(t > 0, p > 0)
    assert abs(volume["jaccard"] - j) < 1e-9
  # each volume alone as data.val scores what per_volume says
  cfg.data.val.update(image=other_image, label=other_labels, region=(), more_volumes=())
  alone, _, _ = loop.validate(cfg, str(tmp_path / "alone"), predict_fn, params, setup.mesh)
  for key in ("ap_50", "ap_75", "jaccard", "num_pred"):
    assert alone[key] == scores["per_volume"][2][key]


def test_more_validation_volumes_are_checked_like_data_val(tmp_path):
  image, label_path, _ = _volumes(tmp_path)
  cfg = _tiny_cfg(image, label_path)
  cfg.data.val.more_volumes = ((image, str(tmp_path / "missing.zarr")),)
  with pytest.raises(UserError, match=r"config\.data\.val\.more_volumes\[0\]\.label: "):
    loop.validate(cfg, str(tmp_path / "run"), None, None, None)
  cfg.data.val.more_volumes = (image, label_path)
  with pytest.raises(UserError, match=r"config\.data\.val\.more_volumes: entry 0 .*trailing comma"):
    config_lib.validate(cfg)
