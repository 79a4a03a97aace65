"""Demo of STT-UNET (split spatio-temporal attention fused by a deformable
conv, plus the denoising front-end) on the synthetic volumes, CPU-sized.

  python -m stt_jax.main --config=configs/demo_stt.py --workdir=runs/demo_stt
  python -m stt_jax.main --config=configs/demo_stt.py:fusion_add --workdir=...

The optional argument after ':' names a preset of stt_jax/presets.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling configs
import demo  # noqa: E402  pylint: disable=g-import-not-at-top

from stt_jax.presets import apply_preset  # noqa: E402


def get_config(preset: str = "stt"):
  c = demo.get_config()
  c.model.attention.heads = 2
  c.model.attention.kv_grid = 8
  c.model.attention.deform_groups = 2
  # SST below 32x32 only: on a 2-core CPU the level-1 blocks (plus the
  # front-end) more than double the step time (1.45 s vs 0.56 s measured).
  c.model.attention.encoder_levels = (2, 3, 4)
  c.model.attention.decoder_levels = (3, 2)
  c.train.steps = 600
  return apply_preset(c, preset)
