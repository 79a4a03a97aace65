"""bench/sst_branch_size.py: a fresh STT-UNET's blocks add nothing (ratio 0);
a block whose projection adds a constant b reports |b| over the rms of what
the fresh network feeds it, the blocks before and after it still 0."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sst_branch_size  # noqa: E402  pylint: disable=wrong-import-position

from stt_jax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from stt_jax import presets  # noqa: E402  pylint: disable=wrong-import-position
from stt_jax.models import unet  # noqa: E402  pylint: disable=wrong-import-position
from stt_jax.train import state as state_lib  # noqa: E402  pylint: disable=wrong-import-position


def test_branch_sizes_of_fresh_and_of_one_constant_branch():
  cfg = presets.apply_preset(config_lib.default_config(), "stt")
  cfg.model.widths = (4, 8, 8, 8, 8)
  model = unet.from_config(cfg.model)
  image = jax.random.uniform(jax.random.key(0), (1, 4, 32, 32, 1))
  params = state_lib.init_params(model, image.shape[1:4], seed=1)
  fresh = sst_branch_size.branch_sizes(model, params, image)
  blocks = [k for k in fresh if k.startswith("sst")]
  assert blocks and all(fresh[b]["branch_over_input"] == 0.0 for b in blocks)
  assert fresh["denoise"]["change_over_image"] < 0.1  # the gate starts near 0
  for b in blocks:  # what the report reads is the kernel's own rms
    kernel = np.asarray(params[b]["temporal"]["key"]["kernel"], np.float64)
    assert fresh[b]["temporal_key_kernel_rms"] == np.sqrt(np.mean(kernel ** 2))
  # the fresh net's block output is its input (zero proj): what block `target` is fed
  target = blocks[1]
  fed = np.asarray(sst_branch_size.intermediates(model, params, image)[target]["__call__"][0],
                   np.float64)
  changed = jax.tree.map(lambda x: x, params)
  changed[target]["proj"]["bias"] = jnp.full_like(params[target]["proj"]["bias"], -0.3)
  sizes = sst_branch_size.branch_sizes(model, changed, image)
  np.testing.assert_allclose(sizes[target]["branch_over_input"],
                             0.3 / np.sqrt(np.mean(fed ** 2)), rtol=1e-5)
  assert all(sizes[b]["branch_over_input"] == 0.0 for b in blocks if b != target)
