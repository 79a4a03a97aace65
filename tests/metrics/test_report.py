import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.errors import UserError
from stt_jax.metrics import instance_ap, report, semantic


def test_volumes_on_disk_score_as_arrays_in_memory(tmp_path):
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 30, (10, 40, 36)).astype(np.uint32)
  pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 30, gt.shape)).astype(np.uint32)
  gt_vol = sources.write_array(str(tmp_path / "gt.zarr"), gt)
  pred_vol = sources.write_array(str(tmp_path / "pred.zarr"), pred)
  blocked = report.score_volumes(gt_vol, pred_vol, min_gt_size=0, block=(4, 16, 16))
  ap = instance_ap.average_precision(gt, pred)
  fg = semantic.foreground_scores(gt > 0, pred > 0)
  assert blocked["ap_75"] == pytest.approx(ap["ap_75"])
  assert blocked["ap_50_95"] == pytest.approx(ap["ap"])
  assert blocked["mcc"] == pytest.approx(fg["mcc"])
  assert blocked["num_pred"] == 29
  text = report.format_table(blocked, "t")
  assert "voxel MCC" in text and "AP-75" in text


def test_shape_mismatch_is_one_clear_error():
  with pytest.raises(UserError, match="differ in shape"):
    report.score_volumes(np.zeros((2, 3, 4), np.uint32), np.zeros((2, 3, 5), np.uint32),
                         min_gt_size=0)
