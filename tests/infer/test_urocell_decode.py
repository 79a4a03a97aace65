"""The instance decoder on real mitochondria shapes (UroCell labels, many
branched or touching): probability maps made from the labels plus noise are
decoded back with AP-75 >= 0.9, and blockwise decoding equals whole-volume
decoding on them."""

import numpy as np
import pytest

from stt_jax.data import sources
from stt_jax.infer import blockwise, postprocess
from stt_jax.metrics.instance_ap import average_precision

from .test_blockwise import probabilities_from_labels, same_up_to_relabelling

SETTINGS = dict(seed_mask=0.9, seed_contour=0.8, foreground=0.85, min_seed_size=16,
                min_size=100)


def _whole(probs):
  return postprocess.decode_instances(probs[..., 0], probs[..., 1], **SETTINGS)


def test_decoder_recovers_real_instances(urocell_volumes):
  scores = {}
  for name, labels in urocell_volumes.items():
    decoded = _whole(probabilities_from_labels(labels, seed=1, noise=0.1))
    scores[name] = average_precision(labels, decoded)["ap_75"]
  assert min(scores.values()) >= 0.9, scores


def test_blockwise_equals_whole_on_real_shapes(tmp_path, urocell_volumes):
  labels = urocell_volumes["fib1-3-3-0"]  # 83 instances, the most crowded
  probs = probabilities_from_labels(labels, seed=2, noise=0.1)
  whole = _whole(probs)
  vol = sources.write_array(str(tmp_path / "p.zarr"), probs)
  # 16 blocks with a halo half their size: the count of foreground components
  # reaching past a halo is a conservative warning (here 49 flagged, up to
  # 92 voxels long), and the result is still exactly the whole-volume one
  settings = blockwise.DecodeSettings(**SETTINGS, block=(64, 128, 128), halo=(32, 64, 64))
  out, stats = blockwise.decode(vol, str(tmp_path / "out"), settings)
  assert stats["blocks"] == 16 and stats["components_cut_by_halo"] > 0
  assert stats["halo_note"].startswith(
      f"note: {stats['components_cut_by_halo']} foreground components reach past decode.halo")
  assert stats["instances"] == whole.max() > 60
  assert same_up_to_relabelling(whole, out.read([0, 0, 0], out.shape))
