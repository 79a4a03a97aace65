import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.infer import sliding_window
from stt_jax.train.step import make_mesh


@pytest.mark.parametrize("size,window,overlap", [(10, 4, 0.5), (64, 16, 0.25),
                                                 (7, 7, 0.5), (5, 8, 0.5), (33, 8, 0.0)])
def test_window_starts_cover_the_axis(size, window, overlap):
  starts = sliding_window.window_starts(size, window, overlap)
  covered = np.zeros(size, bool)
  for s in starts:
    covered[s:s + window] = True
    assert s >= 0 and (s + window <= size or s == 0)
  assert covered.all() and starts == sorted(set(starts))


def test_blending_weights_peak_at_centre():
  w = sliding_window.blending_weights((5, 9, 9))
  assert w.argmax() == np.ravel_multi_index((2, 4, 4), w.shape)
  assert w.min() > 0 and w.max() == pytest.approx(1 + 1e-4)


def test_blended_prediction_of_a_pointwise_map_is_exact(tmp_path):
  # a window-independent prediction must come out unchanged after blending,
  # whatever the windows, overlaps and volume edges
  image = np.random.default_rng(0).integers(0, 256, (9, 40, 37)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = jax.jit(lambda params, x: jnp.concatenate([x, 1 - x], -1) * params)
  probs = sliding_window.predict_volume(fn, jnp.float32(1.0), vol, mesh,
                                        window=(4, 16, 16), overlap=0.5, batch_size=2)
  np.testing.assert_allclose(probs[..., 0], image / 255.0, atol=1e-5)
  np.testing.assert_allclose(probs[..., 1], 1 - image / 255.0, atol=1e-5)


class _CumsumModel:
  """A 'model' that is not flip-invariant: logit(p) of a running mean along
  each axis, so each test-time transform changes the raw output."""

  def apply(self, variables, x):
    y = (jnp.cumsum(x, 1) + jnp.cumsum(x, 2) * 0.5 + jnp.cumsum(x, 3) * 0.25) / 10.0
    p = jnp.clip(jnp.concatenate([y, x], -1) * variables["params"], 1e-4, 1 - 1e-4)
    return jnp.log(p) - jnp.log1p(-p)


def test_predict_function_runs_the_model_forward_only():
  """Windows are never differentiated: the predict function lets `auto` pick
  the conv forms with the fast forward at every width (models/layers.py)."""
  from stt_jax.models.unet import ResUNet  # pylint: disable=g-import-not-at-top
  model = ResUNet(widths=(20, 20, 24, 24, 24))
  x = jnp.zeros((2, 4, 32, 32, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  fn = sliding_window.make_predict_fn(model, make_mesh())
  jaxpr = str(jax.make_jaxpr(fn)(params, x))
  assert jaxpr.count("custom_vjp_call") == 1 + 2 * 9  # the head, every 3x3x3 conv
  assert not model.forward_only  # the caller's model is left as it was


@pytest.mark.parametrize("mode", ["flips", "flips_transpose"])
def test_test_time_augmentation_averages_the_inverse_transformed_outputs(mode):
  x = np.random.default_rng(0).random((2, 4, 6, 6, 1)).astype(np.float32)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh, tta=mode)
  got = np.asarray(fn(jnp.float32(0.9), jnp.asarray(x)))

  def raw(v):
    y = (np.cumsum(v, 1) + np.cumsum(v, 2) * 0.5 + np.cumsum(v, 3) * 0.25) / 10.0
    return np.clip(np.concatenate([y, v], -1) * 0.9, 1e-4, 1 - 1e-4)

  outs = []
  for transpose in ((False, True) if mode == "flips_transpose" else (False,)):
    for flips in itertools.product((False, True), repeat=3):
      axes = tuple(a for a, f in zip((1, 2, 3), flips) if f)
      v = np.flip(x, axes) if axes else x
      v = np.swapaxes(v, 2, 3) if transpose else v
      p = raw(v)
      p = np.swapaxes(p, 2, 3) if transpose else p
      outs.append(np.flip(p, axes) if axes else p)
  assert len(outs) == (16 if mode == "flips_transpose" else 8)
  np.testing.assert_allclose(got, np.mean(outs, 0), atol=1e-5)
  assert not np.allclose(got, raw(x), atol=1e-3)


def test_blocks_and_whole_volume_give_the_same_blend(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (10, 45, 38)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  whole = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh, window=(4, 16, 16),
                                        overlap=0.5, batch_size=4)
  for block in ((4, 16, 16), (3, 20, 50)):
    blocked = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh,
                                            window=(4, 16, 16), overlap=0.5, batch_size=4,
                                            block=block)
    np.testing.assert_allclose(blocked, whole, atol=1e-6)


def _numpy_blend(image: np.ndarray, window, overlap: float) -> np.ndarray:
  """Independent reference: every window of the global grid through the
  numpy twin of _CumsumModel (params 0.9), Gaussian-weighted, normalised."""
  starts = [sliding_window.window_starts(s, w, overlap) for s, w in zip(image.shape, window)]
  axes = [np.linspace(-1.0, 1.0, n) for n in window]
  r2 = sum(g ** 2 for g in np.meshgrid(*axes, indexing="ij"))
  weight = (1e-4 + np.exp(-r2 / (2 * 0.2 ** 2)))[..., None]
  total = np.zeros((*image.shape, 2))
  norm = np.zeros((*image.shape, 1))
  for start in itertools.product(*starts):
    box = tuple(slice(s, s + w) for s, w in zip(start, window))
    v = image[box][None, ..., None] / 255.0
    y = (np.cumsum(v, 1) + np.cumsum(v, 2) * 0.5 + np.cumsum(v, 3) * 0.25) / 10.0
    total[box] += np.clip(np.concatenate([y, v], -1) * 0.9, 1e-4, 1 - 1e-4)[0] * weight
    norm[box] += weight
  return total / norm


def test_segment_path_writes_the_numpy_blend_as_uint8(tmp_path):
  from stt_jax.config import default_config
  from stt_jax.infer import pipeline, postprocess
  image = np.random.default_rng(2).integers(0, 256, (11, 41, 36)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  cfg = default_config()
  cfg.infer.window, cfg.infer.overlap, cfg.infer.batch_size = (4, 16, 16), 0.5, 4
  cfg.infer.block_shape = (5, 20, 16)  # 3 x 3 x 3 blocks, edge blocks smaller
  expected = _numpy_blend(image, (4, 16, 16), 0.5)
  out, plan = pipeline.predict(cfg, fn, jnp.float32(0.9), vol, mesh, str(tmp_path / "seg"),
                               voxel_size_nm=(1, 1, 1))
  assert plan["blocks"] == 27 and plan["blocks_done_before"] == 0
  got = out.read((0, 0, 0, 0), out.shape)
  assert got.dtype == np.uint8 and got.shape == (*image.shape, 2)
  want = np.clip(np.round(expected * 255.0), 0, 255)
  diff = np.abs(got.astype(np.int32) - want)
  # float32 against float64: a value within rounding of a .5 tie (channel 1 is
  # image x 0.9 where windows agree: a tie for every 10th grey level) may land
  # on the other level; everywhere else the levels are equal
  near_tie = np.abs(expected * 255.0 % 1.0 - 0.5) < 1e-3
  assert diff.max() <= 1 and near_tie.mean() < 0.1
  np.testing.assert_array_equal(diff[~near_tie], 0)
  floats = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh, window=(4, 16, 16),
                                         overlap=0.5, batch_size=4, block=(5, 20, 16))
  np.testing.assert_allclose(floats, expected, atol=1e-5)
  # the uint8 made on the devices is the host rounding of the same floats
  np.testing.assert_array_equal(got, postprocess.as_uint8(floats))


def test_run_queues_the_next_block_before_handing_over_the_current(tmp_path):
  image = np.random.default_rng(3).integers(0, 256, (8, 32, 32)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  predictor = sliding_window.BlockPredictor(fn, jnp.float32(0.9), mesh, image.shape,
                                            window=(4, 16, 16), overlap=0.5, batch_size=2,
                                            block=(4, 16, 32))
  events = []
  dispatch = predictor.dispatch

  def recording_dispatch(block, *args, **kwargs):
    events.append(("queued", block.index))
    return dispatch(block, *args, **kwargs)

  predictor.dispatch = recording_dispatch
  todo = list(sliding_window.blocks_lib.iterate(image.shape, (4, 16, 32)))
  assert len(todo) == 4
  for block, probs in predictor.run(vol, todo, as_uint8=True):
    events.append(("handed", block.index))
    assert probs.dtype == np.uint8 and probs.shape == (*block.shape, 2)
  i = [b.index for b in todo]
  assert events == [("queued", i[0]), ("queued", i[1]), ("handed", i[0]),
                    ("queued", i[2]), ("handed", i[1]), ("queued", i[3]),
                    ("handed", i[2]), ("handed", i[3])]


def _one_device_mesh():
  return make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("devices", ["one", "all"])
def test_a_run_started_mid_row_gives_the_same_bytes(tmp_path, devices):
  # a restarted segment run begins at a block whose x-neighbour it has no
  # carry from: it computes the shared windows itself, and must sum them in
  # the same order as the carry did
  image = np.random.default_rng(4).integers(0, 256, (7, 30, 70)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = _one_device_mesh() if devices == "one" else make_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  block = (4, 12, 16)  # 9 or 12 windows per x-start: not whole batches
  predictor = sliding_window.BlockPredictor(fn, jnp.float32(0.9), mesh, image.shape,
                                            window=(4, 8, 12), overlap=0.5, batch_size=4,
                                            block=block)
  todo = list(sliding_window.blocks_lib.iterate(image.shape, block))
  whole = {b.index: p for b, p in predictor.run(vol, todo)}
  for k in (2, 7, 13):  # x positions 2, 2 and 3 of rows with 5 blocks
    assert todo[k].position[2] > 0
    for b, p in predictor.run(vol, todo[k:]):
      np.testing.assert_array_equal(p, whole[b.index], err_msg=f"from {k}, block {b}")


def test_along_x_each_window_is_computed_once(tmp_path):
  image = np.random.default_rng(5).integers(0, 256, (9, 40, 75)).astype(np.uint8)
  vol = sources.write_array(str(tmp_path / "im.zarr"), image)
  mesh = _one_device_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  window, block = (4, 16, 16), (5, 20, 20)
  predictor = sliding_window.BlockPredictor(fn, jnp.float32(0.9), mesh, image.shape,
                                            window=window, overlap=0.5, batch_size=3,
                                            block=block)
  computed = []
  batches = predictor._batches  # pylint: disable=protected-access

  def recording_batches(ranges):
    out = batches(ranges)
    computed.extend(w for group in out for w in group)
    return out

  predictor._batches = recording_batches  # pylint: disable=protected-access
  todo = list(sliding_window.blocks_lib.iterate(image.shape, block))
  for _ in predictor.run(vol, todo):
    pass
  starts = [sliding_window.window_starts(s, w, 0.5) for s, w in zip(image.shape, window)]
  # z and y faces still cost windows twice: count them per block by hand
  per_block = {}
  for b in todo:
    key = b.position[:2]
    zs = [s for s in starts[0] if s < b.stop[0] and s + 4 > b.start[0]]
    ys = [s for s in starts[1] if s < b.stop[1] and s + 16 > b.start[1]]
    per_block[key] = len(zs) * len(ys)
  assert len(computed) == sum(per_block.values()) * len(starts[2])
  grid = len(starts[0]) * len(starts[1]) * len(starts[2])
  assert len(computed) / grid == pytest.approx(
      sliding_window.redundancy(image.shape, window, 0.5, block))
  assert set(computed) == set(itertools.product(*starts))
  # and the blend is still the numpy one
  probs = sliding_window.predict_volume(fn, jnp.float32(0.9), vol, mesh, window=window,
                                        overlap=0.5, batch_size=3, block=block)
  np.testing.assert_allclose(probs, _numpy_blend(image, window, 0.5), atol=1e-5)


def test_default_blocks_waste_fewer_windows_than_cubes_in_less_memory():
  """x faces carry, so the default blocks are deep, tall and thin along x:
  on a MitoEM volume they compute fewer windows twice than 128x1024x1024
  cubes (the default until session 12) with a smaller accumulator."""
  from stt_jax.config import default_config
  i = default_config().infer
  shape, window = (1000, 4096, 4096), tuple(i.window)
  mesh = _one_device_mesh()
  two_channels = lambda params, x: jnp.concatenate([x, x], -1)
  found = {}
  for name, block in (("default", tuple(i.block_shape)), ("cubes", (128, 1024, 1024))):
    predictor = sliding_window.BlockPredictor(two_channels, None, mesh, shape, window=window,
                                              overlap=i.overlap, batch_size=2, block=block)
    found[name] = (sliding_window.redundancy(shape, window, i.overlap, block),
                   int(np.prod(predictor.buffer)))
  assert found["default"][0] < 1.1 < found["cubes"][0]
  assert found["default"][1] < found["cubes"][1]


def test_blocks_too_big_for_the_device_are_refused_naming_blocks_that_fit(monkeypatch):
  """Before any work: the accumulator of 256x2048x128 blocks on a MitoEM
  volume (2.7 GiB per device) on a device allowed 1 GB; the suggested
  shape fits that device."""
  import re
  from stt_jax.errors import UserError
  mesh = _one_device_mesh()
  two_channels = lambda params, x: jnp.concatenate([x, x], -1)
  make = lambda block: sliding_window.BlockPredictor(
      two_channels, None, mesh, (1000, 4096, 4096), window=(32, 256, 256), overlap=0.5,
      batch_size=2, block=block)
  expected = int(np.prod(make((256, 2048, 128)).buffer)) * 3 * 4  # no limit known: runs
  monkeypatch.setattr(sliding_window, "device_memory_limit", lambda m: 10 ** 9)
  with pytest.raises(UserError) as info:
    make((256, 2048, 128))
  message = str(info.value)
  assert "\n" not in message and f"needs {expected / 2 ** 30:.1f} GiB per device" in message
  suggested = tuple(int(v) for v in
                    re.search(r'block_shape="\((\d+),(\d+),(\d+)\)"', message).groups())
  assert int(np.prod(suggested)) < 256 * 2048 * 128
  assert make(suggested).accumulator_bytes <= 0.9 * 10 ** 9
  monkeypatch.setattr(sliding_window, "device_memory_limit", lambda m: 10 ** 6)
  with pytest.raises(UserError, match="no block shape fits these windows"):
    make((256, 2048, 128))


class _RecordingVolume:
  """A volume that records the boxes read from it."""

  def __init__(self, volume):
    self.volume, self.shape, self.path, self.boxes = volume, volume.shape, volume.path, []

  def read_async(self, start, size):
    self.boxes.append((tuple(start), tuple(size)))
    return self.volume.read_async(start, size)


def test_a_block_reads_only_the_input_its_x_neighbour_did_not(tmp_path):
  """Thin blocks share most of their input with the block before them: each
  row reads every x column once (not each block its whole window span), and
  the blend is still the numpy one, from the start and from mid-row."""
  image = np.random.default_rng(6).integers(0, 256, (9, 40, 75)).astype(np.uint8)
  vol = _RecordingVolume(sources.write_array(str(tmp_path / "im.zarr"), image))
  mesh = _one_device_mesh()
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  window, block = (4, 16, 16), (5, 20, 8)  # blocks half a window wide
  predictor = sliding_window.BlockPredictor(fn, jnp.float32(0.9), mesh, image.shape,
                                            window=window, overlap=0.5, batch_size=3,
                                            block=block)
  todo = list(sliding_window.blocks_lib.iterate(image.shape, block))
  got = np.zeros((*image.shape, 2), np.float32)
  for b, p in predictor.run(vol, todo):
    got[b.slices()] = p
  np.testing.assert_allclose(got, _numpy_blend(image, window, 0.5), atol=1e-5)
  rows = {}
  for start, size in vol.boxes:
    rows.setdefault((start[:2], size[:2]), []).append((start[2], start[2] + size[2]))
  assert len(rows) == 2 * 2  # z and y positions of the grid of blocks
  for spans in rows.values():
    assert spans[0][0] == 0 and spans[-1][1] == 75
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no column read twice
  # a run started mid-row reads its first block whole, then goes on the same
  vol.boxes.clear()
  k = 3
  for b, p in predictor.run(vol, todo[k:k + 3]):
    np.testing.assert_array_equal(p, got[b.slices()])
  first = predictor._input_box(todo[k])  # pylint: disable=protected-access
  assert vol.boxes[0] == (tuple(first[0]), tuple(b - a for a, b in zip(*first)))


def test_group_norm_window_note_names_the_training_patch():
  note = sliding_window.group_norm_window_note("group", (8, 256, 256), (4, 256, 256))
  assert note.startswith("note: ") and "\n" not in note
  assert "(8,256,256) patches" in note and "(4,256,256) windows" in note
  assert note.endswith('--config.infer.window="(8,256,256)"')
  # nothing to say: no GroupNorm, the same shape, or an export that predates the record
  assert sliding_window.group_norm_window_note("none", (8, 256, 256), (4, 256, 256)) is None
  assert sliding_window.group_norm_window_note("group", [4, 128, 128], (4, 128, 128)) is None
  assert sliding_window.group_norm_window_note("group", None, (4, 128, 128)) is None


def test_a_windows_device_and_turn_do_not_depend_on_the_tiling():
  """With the batch split over devices each device sums its own windows and
  the sums meet at the end: a voxel's probability is the same bits in two
  runs only if every window joins the same device's sum, in the same order,
  in both. A --region box tiles blocks on other borders than the whole run
  (here: shifted by 3 and 7 voxels), so a window's device must follow from
  its place on the volume's grid, not from its place in a block's list."""
  mesh = make_mesh(devices=jax.devices()[:2])
  assert mesh.shape["data"] == 2
  fn = sliding_window.make_predict_fn(_CumsumModel(), mesh)
  shape, window, block = (12, 70, 60), (4, 16, 16), (8, 40, 30)
  seen = {}
  for box in (None, ((3, 7, 5), (12, 70, 60)), ((1, 2, 0), (11, 66, 60))):
    predictor = sliding_window.BlockPredictor(fn, jnp.float32(0.9), mesh, shape, window=window,
                                              overlap=0.5, batch_size=6, block=block, box=box)
    per = predictor.batch_size // 2
    for b in predictor.blocks():
      ranges = [predictor._window_range(a, b.start[a], b.stop[a]) for a in range(3)]  # pylint: disable=protected-access
      order = {0: [], 1: []}
      for group in predictor._batches(ranges):  # pylint: disable=protected-access
        assert len(group) == predictor.batch_size
        for slot, w in enumerate(group):
          if w is not None:
            order[slot // per].append(w)
            assert seen.setdefault(w, slot // per) == slot // per, (box, b, w)
      for device_windows in order.values():  # x-start first, then the grid's (z, y) order
        assert device_windows == sorted(device_windows, key=lambda w: (w[2], w[0], w[1]))
  assert set(seen.values()) == {0, 1}
