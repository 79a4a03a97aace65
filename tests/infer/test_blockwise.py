import numpy as np
import pytest

from stt_jax.data import sources, synthetic
from stt_jax.data.targets import instance_contour
from stt_jax.infer import blocks, blockwise, postprocess
from stt_jax.metrics.instance_ap import average_precision


def probabilities_from_labels(labels: np.ndarray, seed: int = 0, noise: float = 0.08):
  """uint8 [z, y, x, 2] (mask, contour) made from labels plus Gaussian noise."""
  rng = np.random.default_rng(seed)
  mask = (labels > 0).astype(np.float32)
  contour = instance_contour(labels, 1).astype(np.float32) * mask
  probs = np.stack([mask, contour], -1) + rng.normal(0, noise, (*labels.shape, 2))
  return np.clip(np.round(probs * 255), 0, 255).astype(np.uint8)


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
  if not np.array_equal(a > 0, b > 0):
    return False
  pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
  return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


@pytest.fixture(scope="module")
def volume():
  spec = synthetic.SyntheticSpec(shape=(24, 96, 96), num_mitochondria=30,
                                 radius_range=(3.0, 5.0), length_range=(8.0, 16.0),
                                 touching_fraction=0.2)
  _, labels = synthetic.generate(spec, seed=3)
  return labels, probabilities_from_labels(labels)


@pytest.mark.parametrize("block,halo,min_mean_mask", [((8, 32, 32), (8, 32, 32), 0.0),
                                                      ((12, 48, 40), (8, 32, 32), 0.0),
                                                      ((12, 48, 40), (8, 32, 32), None)])
def test_blockwise_equals_whole_volume_decoding(tmp_path, volume, block, halo, min_mean_mask):
  """Also with decode.min_mean_mask (None: a cut between the objects' mean
  masks that removes some of them), summed over blocks against the whole."""
  labels, probs = volume
  if min_mean_mask is None:
    probs = probs.copy()
    dim = np.isin(labels, np.arange(1, labels.max() + 1, 3))  # every third object dimmer
    probs[..., 0][dim] = (probs[..., 0][dim] * 0.96).astype(np.uint8)
    plain = postprocess.decode_instances(probs[..., 0], probs[..., 1], min_seed_size=8,
                                         min_size=30)
    means = [probs[..., 0][plain == i].mean() / 255 for i in range(1, plain.max() + 1)]
    min_mean_mask = float(np.median(means))
  settings = blockwise.DecodeSettings(min_seed_size=8, min_size=30, block=block, halo=halo,
                                      min_mean_mask=min_mean_mask)
  assert len(list(blocks.iterate(labels.shape, block))) >= 8
  whole = postprocess.decode_instances(
      probs[..., 0], probs[..., 1], seed_mask=settings.seed_mask,
      seed_contour=settings.seed_contour, foreground=settings.foreground,
      min_seed_size=settings.min_seed_size, min_size=settings.min_size,
      min_mean_mask=settings.min_mean_mask)
  vol = sources.write_array(str(tmp_path / "p.zarr"), probs)
  out, stats = blockwise.decode(vol, str(tmp_path / "out"), settings)
  blockwise_labels = out.read([0, 0, 0], out.shape)
  assert stats["components_cut_by_halo"] == 0
  assert whole.max() > 8 and stats["instances"] == whole.max()
  assert same_up_to_relabelling(whole, blockwise_labels)
  assert sorted(np.unique(blockwise_labels)) == list(range(whole.max() + 1))
  if min_mean_mask:
    assert stats["removed_by_mean_mask"] == len(means) - whole.max() > 3
  else:
    assert stats["removed_by_mean_mask"] == 0
    assert whole.max() > 15
    assert average_precision(labels, blockwise_labels, min_gt_size=30)["ap_75"] > 0.9


def test_a_small_halo_is_reported(tmp_path, volume):
  labels, probs = volume
  settings = blockwise.DecodeSettings(min_seed_size=8, min_size=30, block=(8, 32, 32),
                                      halo=(0, 2, 2))
  vol = sources.write_array(str(tmp_path / "p.zarr"), probs)
  _, stats = blockwise.decode(vol, str(tmp_path / "out"), settings)
  assert stats["components_cut_by_halo"] > 0


def test_an_object_crossing_every_block_keeps_one_id(tmp_path):
  labels = np.zeros((16, 40, 40), np.uint32)
  labels[2:14, 5:35, 18:22] = 1   # crosses all 8 blocks' faces in y and z
  labels[4:10, 8:14, 28:36] = 2
  probs = probabilities_from_labels(labels, noise=0.0)
  vol = sources.write_array(str(tmp_path / "p.zarr"), probs)
  settings = blockwise.DecodeSettings(min_seed_size=1, min_size=1, block=(8, 20, 20),
                                      halo=(2, 2, 2))
  out, stats = blockwise.decode(vol, str(tmp_path / "out"), settings)
  result = out.read([0, 0, 0], out.shape)
  assert stats["instances"] == 2
  core = result[3:13, 7:33, 19:21]  # the object minus its contour
  assert len(np.unique(core)) == 1 and core[0, 0, 0] > 0


def test_an_empty_decoding_says_which_step_lost_the_objects(tmp_path, volume):
  """0 instances from an undertrained model (mask never above the seed
  threshold), from contours over every seed, from seeds or objects under the
  size limits: each named, with the knob; the highest mask probability
  reported equals numpy's max over the whole volume (blocks and halos)."""
  labels, probs = volume
  base = dict(min_seed_size=8, min_size=30, block=(12, 48, 40), halo=(8, 32, 32))

  def run(name, p, **settings):
    s = blockwise.DecodeSettings(**{**base, **settings})
    vol = sources.write_array(str(tmp_path / f"{name}.zarr"), p)
    _, stats = blockwise.decode(vol, str(tmp_path / name), s)
    return stats, blockwise.why_no_instances(stats, s)

  stats, note = run("found", probs)
  assert stats["instances"] > 15 and note == ""
  assert stats["max_mask_probability"] == pytest.approx(probs[..., 0].max() / 255, abs=1e-4)

  dim = probs.copy()
  dim[..., 0] = (dim[..., 0].astype(np.float32) * 0.8).astype(np.uint8)  # max 204: 0.8
  dim[:12, :48, :40, 0] = 0  # one block without any mask: its peak 0 is no "unknown"
  stats, note = run("dim", dim)
  assert stats["max_mask_probability"] == pytest.approx(dim[..., 0].max() / 255, abs=1e-4)
  assert stats["instances"] == stats["seeds"] == stats["seed_voxels"] == 0
  assert note == ("0 instances: no voxel's mask probability exceeds decode.seed_mask 0.90 "
                  f"(the highest is {dim[..., 0].max() / 255:.3f}); train longer, or lower "
                  "decode.seed_mask and decode.foreground (0.85) below it")
  # a foreground threshold already under the highest value is not named
  stats, note = run("dim_fg", dim, foreground=0.5)
  assert note.endswith("train longer, or lower decode.seed_mask below it")
  # a mask exactly at the threshold's level is no seed (mask > seed_mask)
  at = np.where(dim[..., :1] > 0, np.uint8(postprocess.level(0.9)), dim[..., :1])
  stats, note = run("at", np.concatenate([at, dim[..., 1:]], -1))
  assert stats["seed_voxels"] == 0 and "exceeds decode.seed_mask" in note

  edged = probs.copy()
  edged[..., 1] = np.maximum(edged[..., 1], 128)  # contour > 0.5 everywhere
  stats, note = run("contour", edged, seed_contour=0.5)
  assert stats["seed_voxels"] == 0 and note.startswith("0 instances: no voxel has mask > "
                                                       "decode.seed_mask 0.90 and contour <=")
  assert note.endswith("raise decode.seed_contour")

  big = int((probs[..., 0] > postprocess.level(0.9)).sum())
  stats, note = run("seeds", probs, min_seed_size=big + 1)
  assert stats["seeds"] == 0 and stats["seed_voxels"] > 0
  assert note == (f"0 instances: {stats['seed_voxels']} seed voxels, but no seed of "
                  f"decode.min_seed_size {big + 1} voxels; lower decode.min_seed_size")

  stats, note = run("small", probs, min_size=int(np.prod(labels.shape)))
  assert stats["instances"] == 0 and stats["seeds"] > 15
  assert note.endswith(f"smaller than decode.min_size {int(np.prod(labels.shape))} voxels; "
                       "lower decode.min_size")

  stats, note = run("unsure", probs, min_mean_mask=1.0)
  assert stats["instances"] == 0 and stats["removed_by_mean_mask"] > 15
  assert note.endswith("has a mean mask probability below decode.min_mean_mask 1.00; "
                       "lower decode.min_mean_mask")
