import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.errors import UserError
from stt_jax.train import checkpoint


def test_run_folder_guard(tmp_path):
  work = str(tmp_path / "run")
  checkpoint.prepare_workdir(work, "{}", resume=False, overwrite=False)
  open(os.path.join(work, "precious.txt"), "w").write("x")
  with pytest.raises(UserError, match="--resume"):
    checkpoint.prepare_workdir(work, "{}", resume=False, overwrite=False)
  assert os.path.exists(os.path.join(work, "precious.txt"))
  checkpoint.prepare_workdir(work, "{}", resume=True, overwrite=False)
  assert os.path.exists(os.path.join(work, "precious.txt"))
  checkpoint.prepare_workdir(work, "{}", resume=False, overwrite=True)
  assert not os.path.exists(os.path.join(work, "precious.txt"))

  foreign = tmp_path / "thesis"
  foreign.mkdir()
  (foreign / "chapter1.tex").write_text("...")
  for kw in ({"resume": False, "overwrite": True}, {"resume": True, "overwrite": False}):
    with pytest.raises(UserError, match="not empty"):
      checkpoint.prepare_workdir(str(foreign), "{}", **kw)
  assert (foreign / "chapter1.tex").read_text() == "..."
  with pytest.raises(UserError, match="no run to resume"):
    checkpoint.prepare_workdir(str(tmp_path / "new"), "{}", resume=True, overwrite=False)


def test_save_restore_is_exact(tmp_path):
  tree = {"w": jax.random.normal(jax.random.key(0), (3, 4)),
          "step": jnp.int32(7), "key": jax.random.key_data(jax.random.key(5))}
  ckpts = checkpoint.Checkpoints(str(tmp_path / "ckpt"), save_every=1, keep=2)
  for step in (1, 2, 3):
    ckpts.save(step, jax.tree.map(lambda x: x + step if x.dtype != jnp.uint32 else x, tree))
  ckpts.close()
  ckpts = checkpoint.Checkpoints(str(tmp_path / "ckpt"), save_every=1, keep=2)
  assert ckpts.latest_step() == 3 and ckpts.manager.all_steps() == [2, 3]
  assert checkpoint.saved_steps(str(tmp_path / "ckpt")) == [2, 3]
  assert checkpoint.saved_steps(str(tmp_path / "none")) == []
  assert not os.path.exists(tmp_path / "none")  # looking creates nothing
  restored = ckpts.restore(tree)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"] + 3))
  np.testing.assert_array_equal(np.asarray(restored["key"]), np.asarray(tree["key"]))
  ckpts.close()


def test_export_round_trip_and_refusal(tmp_path):
  from stt_jax.models import unet  # pylint: disable=g-import-not-at-top
  from stt_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  model = unet.ResUNet(widths=(4, 4, 6), downsample_z=(False, False))
  params = state_lib.init_params(model, (4, 16, 16), seed=3)
  out = str(tmp_path / "export")
  checkpoint.export_weights(out, params, {"name": "res_unet"}, info={"weights": "ema"})
  assert checkpoint.is_export(out)
  # read back with the keys added since (none here) at their old values
  assert checkpoint.read_export_model_config(out) == {
      "name": "res_unet", "outputs": ["mask", "contour"], "norm": "none", "norm_groups": 4,
      "input_scale": [1, 1, 1]}
  loaded = checkpoint.load_export(out, model, (4, 16, 16), step_lib.make_mesh())
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError, match="--overwrite"):
    checkpoint.export_weights(out, params, {})


def test_training_patch_shape_of_runs_and_exports(tmp_path):
  params = {"w": np.zeros((2,), np.float32)}
  older = str(tmp_path / "older_export")  # exports before they recorded it
  checkpoint.export_weights(older, params, {"name": "res_unet"})
  assert checkpoint.training_patch_shape(older) is None
  newer = str(tmp_path / "export")
  checkpoint.export_weights(newer, params, {"name": "res_unet"},
                            info={"training_patch_shape": [8, 256, 256]})
  assert checkpoint.training_patch_shape(newer) == (8, 256, 256)
  work = str(tmp_path / "run")
  checkpoint.prepare_workdir(work, '{"data": {"patch_shape": [4, 128, 128]}}',
                             resume=False, overwrite=False)
  assert checkpoint.training_patch_shape(work) == (4, 128, 128)


def test_best_checkpoint_keeps_the_highest_metric(tmp_path):
  tree = {"w": jnp.zeros((2,))}
  best = checkpoint.Checkpoints(str(tmp_path / "best"), save_every=1, keep=1,
                                best_metric="ap_75")
  for step, ap in ((1, 0.2), (2, 0.5), (3, 0.1)):
    best.save(step, jax.tree.map(lambda x, s=step: x + s, tree), force=True,
              metrics={"ap_75": ap})
  best.wait()
  assert best.best_step() == 2 and best.manager.all_steps() == [2]
  np.testing.assert_array_equal(np.asarray(best.restore(tree)["w"]), [2.0, 2.0])
  best.close()


def test_newest_state_is_the_later_of_checkpoints_and_best(tmp_path):
  tree = {"w": jnp.zeros((2,))}

  def save(name, step):
    ckpts = checkpoint.Checkpoints(str(tmp_path / name), save_every=1, keep=5)
    ckpts.save(step, tree, force=True)
    ckpts.close()

  assert checkpoint.newest_state(str(tmp_path)) is None
  save("best", 4)  # validated at 4, killed before the first periodic save
  assert checkpoint.newest_state(str(tmp_path)) == (str(tmp_path / "best"), 4)
  save("checkpoints", 3)
  assert checkpoint.newest_state(str(tmp_path)) == (str(tmp_path / "best"), 4)
  save("checkpoints", 4)  # a tie: the periodic checkpoint
  assert checkpoint.newest_state(str(tmp_path)) == (str(tmp_path / "checkpoints"), 4)
  save("checkpoints", 6)
  assert checkpoint.newest_state(str(tmp_path)) == (str(tmp_path / "checkpoints"), 6)


def test_resume_refuses_another_models_run(tmp_path):
  work = str(tmp_path / "run")
  checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}}', resume=False,
                             overwrite=False)
  with pytest.raises(UserError, match=r"model.widths: run has \[4, 8\]"):
    checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 16]}}', resume=True,
                               overwrite=False)
  with pytest.raises(UserError, match="loss.adversarial_weight"):
    checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}, '
                               '"loss": {"adversarial_weight": 0.5}}', resume=True,
                               overwrite=False)
  with pytest.raises(UserError, match="train.weight_decay: run has 0.0, config has 0.0001"):
    checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}, '
                               '"train": {"weight_decay": 1e-4}}', resume=True,
                               overwrite=False)
  # clipping keeps no state: switching it is allowed (tests/train/test_state.py)
  checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}, '
                             '"train": {"grad_clip_norm": 1.0}}', resume=True, overwrite=False)
  checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}}', resume=True,
                             overwrite=False)


def test_a_state_of_another_structure_is_one_clear_error(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path / "ckpt"), save_every=1, keep=1)
  ckpts.save(1, {"opt_state": [jnp.zeros(2), jnp.zeros(2)]}, force=True)
  ckpts.wait()
  with pytest.raises(UserError, match=r"checkpoint 1 in .*ckpt holds a state of another "
                     r"structure .*stt_jax_run.json.*init_from") as info:
    ckpts.restore({"opt_state": [jnp.zeros(2), jnp.zeros(2), jnp.zeros(2)]})
  assert "\n" not in str(info.value)
  ckpts.close()


def test_speed_choices_added_later_do_not_block_a_resume(tmp_path):
  """deform_gradient (session 36; sessions 34-35's deform_sorted_gradient)
  and temporal_implementation (35) change neither the parameters nor the
  function: a run made before them resumes under any value, and so does a
  run that has them, in either form."""
  work = str(tmp_path / "run")
  checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8], "attention": {"chunks": 1}}}',
                             resume=False, overwrite=False)
  for order, temporal in (("scatter", "auto"), ("sorted", "pallas"), ("tap_major", "xla")):
    checkpoint.prepare_workdir(
        work, json.dumps({"model": {"widths": [4, 8], "attention": {
            "chunks": 1, "deform_gradient": order, "temporal_implementation": temporal}}}),
        resume=True, overwrite=False)
  old = str(tmp_path / "session35")
  checkpoint.prepare_workdir(old, json.dumps({"model": {"widths": [4, 8], "attention": {
      "chunks": 1, "deform_sorted_gradient": True}}}), resume=False, overwrite=False)
  checkpoint.prepare_workdir(old, json.dumps({"model": {"widths": [4, 8], "attention": {
      "chunks": 1, "deform_gradient": "tap_major"}}}), resume=True, overwrite=False)
  with pytest.raises(UserError, match="model.widths"):  # a real difference still refuses
    checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 6], "attention": {"chunks": 1}}}',
                               resume=True, overwrite=False)


@pytest.mark.parametrize("same, other, message", [
    ('"outputs": ["mask", "contour"]', '"outputs": ["mask", "contour", "distance"]',
     r"model.outputs: run has \['mask', 'contour'\]"),
    ('"norm": "none", "norm_groups": 4', '"norm": "group", "norm_groups": 4',
     r"model.norm: run has 'none', config has 'group'"),
])
def test_runs_made_before_a_model_key_resume_with_its_old_value(tmp_path, same, other,
                                                                 message):
  """A run whose stt_jax_run.json predates a key resumes under the key's old
  value (checkpoint._ADDED_LATER) and refuses any other."""
  work = str(tmp_path / "run")
  checkpoint.prepare_workdir(work, '{"model": {"widths": [4, 8]}}', resume=False,
                             overwrite=False)
  checkpoint.prepare_workdir(work, f'{{"model": {{"widths": [4, 8], {same}}}}}',
                             resume=True, overwrite=False)
  with pytest.raises(UserError, match=message):
    checkpoint.prepare_workdir(work, f'{{"model": {{"widths": [4, 8], {other}}}}}',
                               resume=True, overwrite=False)
