import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stt_jax.data import sources, synthetic
from stt_jax.errors import UserError
from stt_jax.infer import blocks, blockwise

sys.path.insert(0, os.path.dirname(__file__))
import segment_job  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  spec = synthetic.SyntheticSpec(shape=(8, 64, 96), num_mitochondria=10,
                                 radius_range=(3.0, 5.0), length_range=(8.0, 16.0))
  image, _ = synthetic.generate(spec, 0)
  path = str(tmp_path_factory.mktemp("seg") / "image.zarr")
  sources.write_array(path, image, voxel_size_nm=(40.0, 5.0, 5.0))
  return path


@pytest.fixture(scope="module")
def reference(image_path, tmp_path_factory):
  """An uninterrupted run."""
  out = str(tmp_path_factory.mktemp("ref") / "out")
  summary = segment_job.run(image_path, out)
  return out, summary


def _read(path):
  vol = sources.open_volume(path)
  return vol.read([0] * len(vol.shape), vol.shape), vol


def test_outputs_carry_voxel_size_and_a_report(reference):
  out, summary = reference
  probs, pvol = _read(os.path.join(out, "probabilities.zarr"))
  labels, lvol = _read(os.path.join(out, "instances.zarr"))
  assert probs.dtype == np.uint8 and probs.shape == (8, 64, 96, 2)
  assert labels.dtype == np.uint32 and labels.max() == summary["instances"] > 0
  assert lvol.voxel_size_nm == pvol.voxel_size_nm == (40.0, 5.0, 5.0)
  with open(os.path.join(out, "segment.json")) as f:
    assert json.load(f)["finished"]
  for name in ("morphology.csv", "morphology_summary.json", "size_histogram.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert len(os.listdir(os.path.join(out, "previews"))) == 3
  assert not os.path.exists(os.path.join(out, "scratch"))


def test_a_region_segments_as_its_crop_written_to_a_file_of_its_own(tmp_path, image_path):
  box = ((2, 8, 24), (8, 56, 88))
  whole, _ = _read(image_path)
  crop_path = sources.write_array(str(tmp_path / "crop.zarr"),
                                  whole[2:8, 8:56, 24:88], voxel_size_nm=(40.0, 5.0, 5.0)).path
  from_crop = segment_job.run(crop_path, str(tmp_path / "crop_out"))
  from_region = segment_job.run(image_path, str(tmp_path / "region_out"), region=box)
  assert from_region["volume_shape"] == [6, 48, 64] and from_region["instances"] > 0
  for name in ("probabilities.zarr", "instances.zarr"):
    a, _ = _read(str(tmp_path / "crop_out" / name))
    b, vol = _read(str(tmp_path / "region_out" / name))
    np.testing.assert_array_equal(a, b)
    assert vol.voxel_size_nm == (40.0, 5.0, 5.0)
  with open(tmp_path / "crop_out" / "morphology.csv") as f_a, \
       open(tmp_path / "region_out" / "morphology.csv") as f_b:
    assert f_a.read() == f_b.read()
  with open(tmp_path / "region_out" / "segment.json") as f:
    settings = json.load(f)["settings"]
  assert settings["input"] == os.path.abspath(image_path)
  assert settings["input_region"] == [list(box[0]), list(box[1])]


def test_a_region_with_context_has_the_whole_volumes_probabilities(tmp_path, image_path,
                                                                   reference):
  """--region's way: windows on the whole volume's grid read the image around
  the box (box corners off the window and block grids), so the box's
  probabilities are the whole run's, byte for byte, and its instances those
  decoded from that crop."""
  box = ((1, 5, 27), (7, 50, 90))
  crop = tuple(slice(a, b) for a, b in zip(*box))
  ref_out, _ = reference
  whole_probs, _ = _read(os.path.join(ref_out, "probabilities.zarr"))
  out = str(tmp_path / "region_out")
  summary = segment_job.run(image_path, out, region=box, region_context=True)
  probs, _ = _read(os.path.join(out, "probabilities.zarr"))
  np.testing.assert_array_equal(probs, whole_probs[crop])
  # the same box predicted as a volume of its own differs at its faces
  alone = segment_job.run(image_path, str(tmp_path / "alone"), region=box)
  assert alone["instances"] > 0
  assert (_read(str(tmp_path / "alone" / "probabilities.zarr"))[0] != probs).any()
  cropped = sources.write_array(str(tmp_path / "cropped.zarr"), whole_probs[crop])
  settings = blockwise.DecodeSettings.from_config(segment_job.tiny_config().decode)
  expected, _ = blockwise.decode(cropped, str(tmp_path / "decoded"), settings)
  np.testing.assert_array_equal(_read(os.path.join(out, "instances.zarr"))[0],
                                expected.read((0, 0, 0), expected.shape))
  assert summary["instances"] > 0
  with open(os.path.join(out, "segment.json")) as f:
    assert json.load(f)["settings"]["region_context"] is True
  # both outputs say where the box lies, so viewers overlay them on the image
  # (its start times the image's 40 x 5 x 5 nm); the whole run's lie at 0
  assert summary["translation_nm"] == [40.0, 25.0, 135.0]
  for name in ("probabilities.zarr", "instances.zarr"):
    assert sources.open_volume(os.path.join(out, name)).translation_nm == (40.0, 25.0, 135.0)
    assert sources.open_volume(os.path.join(ref_out, name)).translation_nm is None


def _assert_equals_reference(out, reference):
  for name in ("probabilities.zarr", "instances.zarr"):
    np.testing.assert_array_equal(_read(os.path.join(out, name))[0],
                                  _read(os.path.join(reference[0], name))[0])
  with open(os.path.join(out, "morphology.csv")) as f_a, \
       open(os.path.join(reference[0], "morphology.csv")) as f_b:
    assert f_a.read() == f_b.read()


def test_parts_one_after_another_equal_one_run_and_the_last_decodes(tmp_path, image_path,
                                                                      reference):
  out = str(tmp_path / "out")
  # 2 x 2 rows of 3 blocks: parts 0, 1, 2 of 3 own rows {0, 3}, {1}, {2}
  first = segment_job.run(image_path, out, part=(0, 3))
  assert first == {"part": [0, 3], "predicted_blocks": 6, "blocks_left": 6,
                   "predict_seconds": first["predict_seconds"]}
  assert not blocks.is_finished(out)
  again = segment_job.run(image_path, out, part=(0, 3))  # a rerun skips its blocks
  assert (again["predicted_blocks"], again["blocks_left"]) == (0, 6)
  assert segment_job.run(image_path, out, part=(2, 3))["blocks_left"] == 3
  last = segment_job.run(image_path, out, part=(1, 3))
  assert last["predicted_blocks"] == 3 and last["instances"] == reference[1]["instances"]
  assert blocks.is_finished(out)
  _assert_equals_reference(out, reference)
  with pytest.raises(UserError, match="finished segmentation"):
    segment_job.run(image_path, out, part=(2, 3))


def test_a_part_left_unfinished_is_completed_by_a_run_without_parts(tmp_path, image_path,
                                                                   reference):
  out = str(tmp_path / "out")
  segment_job.run(image_path, out, part=(1, 2))
  whole = segment_job.run(image_path, out)
  assert whole["resumed"] and whole["predict_plan"]["blocks_done_before"] == 6
  _assert_equals_reference(out, reference)


def test_parts_started_together_decode_once(tmp_path, image_path, reference):
  out = str(tmp_path / "out")
  env = dict(os.environ, PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/infer/segment_job.py"),
                             image_path, out, f"--part={i}/2"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
  decoded = [o for o, _ in outputs if o.startswith("instances")]
  assert len(decoded) == 1, outputs
  _assert_equals_reference(out, reference)


def test_a_finished_output_is_never_overwritten(reference, image_path):
  out, _ = reference
  before = os.path.getmtime(os.path.join(out, "segment.json"))
  with pytest.raises(UserError, match="--overwrite"):
    segment_job.run(image_path, out)
  assert os.path.getmtime(os.path.join(out, "segment.json")) == before


def test_an_unfinished_run_with_other_settings_is_refused(tmp_path, image_path):
  out = str(tmp_path / "out")
  blocks.open_output(out, {"input": "elsewhere"}, overwrite=False)
  with pytest.raises(UserError, match="different input"):
    segment_job.run(image_path, out)


@pytest.mark.parametrize("stage", ["predict", "watershed"])
def test_a_killed_run_rerun_equals_an_uninterrupted_one(tmp_path, image_path, reference,
                                                        stage):
  out = str(tmp_path / "out")
  cmd = [sys.executable, os.path.join(ROOT, "tests/infer/segment_job.py"), image_path, out]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  marks = os.path.join(out, "progress", stage)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    # finished marks only: a mark being written is a <index>.npz.tmp.npz for a moment
    if os.path.isdir(marks) and sum(".tmp" not in n for n in os.listdir(marks)) >= 2:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  with open(os.path.join(out, "segment.json")) as f:
    assert not json.load(f)["finished"]
  summary = segment_job.run(image_path, out)
  assert summary["resumed"]
  plan = summary["predict_plan"]  # 2 x 2 x 3 blocks of 4 x 32 x 32
  assert plan["blocks"] == 12
  # killed while predicting: at least the 2 blocks seen finished are skipped;
  # killed in the watershed: all of them
  assert plan["blocks_done_before"] >= 2 if stage == "predict" else plan["blocks_done_before"] == 12
  ref_out, _ = reference
  for name in ("probabilities.zarr", "instances.zarr"):
    np.testing.assert_array_equal(_read(os.path.join(out, name))[0],
                                  _read(os.path.join(ref_out, name))[0])


def _upsampled_reference(coarse: np.ndarray, shape, origin=(0, 0, 0), factors=(1, 2, 2)):
  """scipy's linear interpolation at fine voxel centres, rounded: the
  independent answer for a binned model's probabilities at the input's voxels."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  grid = np.meshgrid(*((np.arange(n) + o + 0.5) / f - 0.5
                       for n, o, f in zip(shape, origin, factors)), indexing="ij")
  return np.stack([np.rint(ndimage.map_coordinates(coarse[..., c].astype(np.float64), grid,
                                                   order=1, mode="nearest"))
                   for c in range(coarse.shape[-1])], axis=-1).astype(np.uint8)


def test_a_binned_model_reads_means_and_decodes_at_the_input_voxels(tmp_path, image_path):
  """model.input_scale (1, 2, 2): the model sees the 2 x 2 means (the same
  probabilities as a run on a binned copy), and the instances are those
  decoded from scipy's upsampling of them, at the input's voxels."""
  whole, _ = _read(image_path)
  binned = np.rint(whole.reshape(8, 32, 2, 48, 2).mean(axis=(2, 4))).astype(np.uint8)
  copy = sources.write_array(str(tmp_path / "binned.zarr"), binned,
                             voxel_size_nm=(40.0, 10.0, 10.0)).path
  segment_job.run(copy, str(tmp_path / "on_copy"))
  coarse, _ = _read(str(tmp_path / "on_copy" / "probabilities.zarr"))
  out = str(tmp_path / "scaled")
  summary = segment_job.run(image_path, out, input_scale=(1, 2, 2))
  probs, pvol = _read(os.path.join(out, "probabilities.zarr"))
  np.testing.assert_array_equal(probs, coarse)
  assert pvol.voxel_size_nm == (40.0, 10.0, 10.0)
  fine = sources.write_array(str(tmp_path / "fine.zarr"), _upsampled_reference(coarse, (8, 64, 96)))
  settings = blockwise.DecodeSettings.from_config(segment_job.tiny_config().decode)
  expected, _ = blockwise.decode(fine, str(tmp_path / "decoded"), settings)
  labels, lvol = _read(os.path.join(out, "instances.zarr"))
  assert labels.shape == (8, 64, 96) and lvol.voxel_size_nm == (40.0, 5.0, 5.0)
  np.testing.assert_array_equal(labels, expected.read((0, 0, 0), expected.shape))
  assert summary["instances"] == labels.max() > 0
  with open(os.path.join(out, "segment.json")) as f:
    assert json.load(f)["settings"]["input_scale"] == [1, 2, 2]


def test_a_binned_models_region_with_context_is_the_whole_volumes(tmp_path, image_path):
  """A box off the bin grid (odd starts and stops): its probabilities are the
  whole run's coarse ones around it, its instances those decoded from the
  whole run's upsampling cropped to the box; both outputs lie where the box
  does."""
  box = ((1, 5, 27), (7, 50, 90))
  whole_out = str(tmp_path / "whole")
  segment_job.run(image_path, whole_out, input_scale=(1, 2, 2))
  coarse, _ = _read(os.path.join(whole_out, "probabilities.zarr"))
  out = str(tmp_path / "box")
  summary = segment_job.run(image_path, out, region=box, region_context=True,
                            input_scale=(1, 2, 2))
  probs, pvol = _read(os.path.join(out, "probabilities.zarr"))
  # binned box grown to whole bins and one more: y 5..50 -> 1..26, x 27..90 -> 12..46
  np.testing.assert_array_equal(probs, coarse[1:7, 1:26, 12:46])
  up = _upsampled_reference(coarse, (8, 64, 96))[1:7, 5:50, 27:90]
  fine = sources.write_array(str(tmp_path / "fine.zarr"), up)
  settings = blockwise.DecodeSettings.from_config(segment_job.tiny_config().decode)
  expected, _ = blockwise.decode(fine, str(tmp_path / "decoded"), settings)
  labels, lvol = _read(os.path.join(out, "instances.zarr"))
  np.testing.assert_array_equal(labels, expected.read((0, 0, 0), expected.shape))
  assert summary["instances"] > 0
  assert lvol.translation_nm == (40.0, 25.0, 135.0)
  assert pvol.translation_nm == (40.0, 10.0, 120.0)  # coarse voxel (1, 1, 12) of 40 x 10 x 10
