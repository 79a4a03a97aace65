"""A segment run of a tiny untrained model (fixed weights) for the pipeline
tests: python tests/infer/segment_job.py IMAGE OUT [--overwrite] [--part=I/N]."""

import sys

import numpy as np

from stt_jax import backend
from stt_jax.data import sources
from stt_jax.infer import pipeline, sliding_window
from stt_jax.models import unet
from stt_jax.train import state, step


def tiny_config(bench: bool = False):
  sys.path.insert(0, "configs")
  import demo  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config()
  cfg.model.widths = (4, 8)
  cfg.model.downsample_z = (False,)
  # the form whose window outputs are the same bits in every batch slot on
  # XLA:CPU: the region tests compare runs byte for byte ('auto' is
  # depth_as_batch at these widths, which moves a rare value by an ulp)
  cfg.model.conv_impl = "im2col"
  cfg.infer.window = (4, 16, 16)
  cfg.infer.batch_size = 4
  cfg.infer.block_shape = (4, 32, 32)
  cfg.decode.block_shape = (4, 32, 32)
  cfg.decode.halo = (2, 8, 8)
  cfg.decode.min_seed_size = 2
  cfg.decode.min_size = 4
  # an untrained net is a smooth function of intensity: decode at its levels
  cfg.decode.seed_mask = 0.5
  cfg.decode.seed_contour = 0.6
  cfg.decode.foreground = 0.45
  if bench:  # bench/segment_memory.py: small blocks, so that even the
    # smaller volume has an interior block (whose halo and window margin are
    # not clipped by the volume's faces: the largest per-block memory)
    cfg.infer.window = (8, 64, 64)
    cfg.infer.block_shape = (16, 128, 128)
    cfg.decode.block_shape = (16, 128, 128)
    cfg.decode.halo = (4, 16, 16)
  return cfg


def run(image_path: str, out: str, overwrite: bool = False, quiet: bool = True,
        bench: bool = False, region=None, region_context: bool = False, part=(0, 1),
        input_scale=(1, 1, 1)):
  cfg = tiny_config(bench)
  cfg.model.input_scale = tuple(input_scale)
  model = unet.from_config(cfg.model)
  params = state.init_params(model, cfg.infer.window, seed=0)
  mesh = step.make_mesh()
  fn = sliding_window.make_predict_fn(model, mesh, cfg.infer.tta)
  image = sources.open_volume(image_path)
  if region is not None:
    image = sources.RegionVolume(image, *region)
  return pipeline.segment(cfg, fn, params, image, mesh, out, overwrite=overwrite, quiet=quiet,
                          region_context=region_context, part=part)


if __name__ == "__main__":
  backend.configure(tiny_config().backend)  # as stt_jax.main does, first
  parts = [a.split("=")[1].split("/") for a in sys.argv if a.startswith("--part=")]
  summary = run(sys.argv[1], sys.argv[2], overwrite="--overwrite" in sys.argv,
                bench="--bench" in sys.argv,
                part=tuple(int(v) for v in parts[0]) if parts else (0, 1))
  if "instances" in summary:
    print("instances", summary["instances"], np.prod(summary["volume_shape"]))
  else:
    print("predicted", summary["predicted_blocks"], "left", summary["blocks_left"])
