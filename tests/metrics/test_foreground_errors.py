"""foreground_errors against counts worked out by hand."""

import numpy as np
import pytest

from stt_jax.metrics import foreground_errors


def test_breakdown_of_a_wide_boundary_an_invented_and_a_missed_object():
  gt = np.zeros((2, 40, 40), bool)
  pred = np.zeros_like(gt)
  gt[:, 5:10, 5:10] = True                 # object A: 2 x 25 voxels
  pred[:, 4:11, 4:11] = True               # ... predicted one pixel too wide: 2 x 24 FP at distance 1
  gt[:, 30:34, 5:9] = True                 # object B, missed: 2 x 16 FN
  pred[0, 30:35, 30:35] = True             # invented object C: 25 FP, >= 16 px from A, 21 from B
  b = foreground_errors.error_breakdown(gt, pred)
  assert (b["tp"], b["fp"], b["fn"]) == (50, 48 + 25, 32)
  assert b["jaccard"] == pytest.approx(50 / (50 + 73 + 32))
  assert b["fp_by_distance"]["[0, 2)"] == pytest.approx(48 / 73)
  assert b["fp_by_distance"]["[16, inf)"] == pytest.approx(25 / 73)
  assert b["fp_in_false_objects"] == pytest.approx(25 / 73)
  # B's voxels are 20-29 px from the prediction's nearest voxel (A's frame, x=4..10)
  assert b["fn_by_distance"]["[16, inf)"] == pytest.approx(1.0)
  assert b["fn_in_missed_objects"] == pytest.approx(1.0)
  assert b["jaccard_without_fp_within"]["2"] == pytest.approx(50 / (50 + 25 + 32))
  assert b["jaccard_without_fp_within"]["16"] == pytest.approx(50 / (50 + 25 + 32))


def test_a_section_without_truth_puts_its_false_positives_at_infinity():
  gt = np.zeros((2, 8, 8), bool)
  pred = np.zeros_like(gt)
  gt[0, 2:4, 2:4] = True
  pred[0, 2:4, 2:4] = True
  pred[1, 2:4, 2:4] = True                 # right place, wrong section: no truth there
  b = foreground_errors.error_breakdown(gt, pred)
  assert b["fp"] == 4 and b["fp_by_distance"]["[16, inf)"] == 1.0
  # one 3D object, half of it on the truth: not invented
  assert b["fp_in_false_objects"] == 0.0
  assert b["fn_in_missed_objects"] == 0.0 and b["fn"] == 0


def test_mismatched_shapes_are_refused():
  with pytest.raises(ValueError, match="one shape"):
    foreground_errors.error_breakdown(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))
