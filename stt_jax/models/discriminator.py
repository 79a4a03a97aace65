"""Discriminator of the semantic FG-BG adversarial loss (paper §2.2, Fig. 2c).

Input concat(image, mask) [batch, depth, height, width, 2]; two 3D
convolutions with stride 2 (leaky ReLU), then a 1x1x1 head giving one logit
per region of the 4x-down-sampled grid (PatchGAN-style) rather than one per
patch: the clutter the loss is meant to reject is local (a dark blob, a
membrane), and per-region decisions give the generator a gradient where the
mistake is, not a single scalar for the whole patch. A patch-level score is
the mean of the region logits. z is strided only where the patch is deep
enough (depth >= 4) to keep anisotropic patches of few slices valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class Discriminator(nn.Module):
  features: tuple[int, int] = (32, 64)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, mask: jax.Array) -> jax.Array:
    """image, mask: [b, d, h, w, 1] -> region logits [b, d', h/4, w/4, 1]."""
    x = jnp.concatenate([image, mask], axis=-1).astype(self.dtype)
    depth = x.shape[1]
    for i, width in enumerate(self.features):
      stride_z = 2 if depth >= 4 else 1
      depth = -(-depth // stride_z)
      x = nn.Conv(width, (3, 3, 3), strides=(stride_z, 2, 2), padding="SAME",
                  dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (1, 1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)
