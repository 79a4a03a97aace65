"""Demo: the baseline Res-UNet on embedded synthetic EM volumes, sized for a
2-core CPU (a few minutes). Train on one generated volume, score on another.

  python -m stt_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from stt_jax.config import AUGMENT_PROBABILITIES, default_config


def get_config():
  c = default_config()
  c.model.widths = (12, 16, 24, 32, 48)
  # GroupNorm and a 3x3 contour (not the original's 5x5): in 750 steps the
  # original's setup learns the foreground but hardly any instance (these
  # tubes are 10-20 px wide, so a 5x5 contour covers 44 % of their voxels and
  # the class-balanced contour head calls most of each object contour: seeds
  # shatter). Measured side by side in session 25 (docs/architecture.md,
  # "Targets and losses"): held-out Jaccard 0.70 -> 0.82, AP-50 0.03 -> 0.17,
  # AP-75 0.001 -> 0.09.
  c.model.norm = "group"
  c.data.contour_width = 1
  c.data.synthetic.enabled = True
  c.data.synthetic.train_shape = (32, 256, 256)
  c.data.synthetic.val_shape = (32, 192, 192)
  c.data.patch_shape = (8, 64, 64)
  # Gamma 2^±1 (the reference default) slows a few-minute run too much. The
  # rest of the MitoEM set (elastic, rescale, defects) is off too: the demo's
  # README figures were measured without it (its effect here is not measured).
  for key in AUGMENT_PROBABILITIES:
    c.data.augment[key] = 0.0
  c.data.foreground_bias = 0.5
  c.train.steps = 750
  c.train.schedule = "cosine"
  c.train.batch_size = 2
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.infer.window = (8, 64, 64)
  c.infer.batch_size = 8
  c.decode.min_seed_size = 16
  c.decode.min_size = 64
  c.eval.min_gt_size = 100
  return c
