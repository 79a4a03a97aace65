"""Discriminator of the semantic FG-BG adversarial loss (paper §2.2, Fig. 2c).

Input concat(image, mask) [batch, depth, height, width, 2]; two 3D
convolutions with stride 2 (leaky ReLU), then a 1x1x1 head giving one logit
per region of the 4x-down-sampled grid (PatchGAN-style) rather than one per
patch: the clutter the loss is meant to reject is local (a dark blob, a
membrane), and per-region decisions give the generator a gradient where the
mistake is, not a single scalar for the whole patch. A patch-level score is
the mean of the region logits. z is strided only where the patch is deep
enough (depth >= 4) to keep anisotropic patches of few slices valid.

The strided convs go through `layers.conv3d` (zero padding 1, the output
ceil(n / stride) as "SAME"): on CPU it writes them as 2D convs, because
XLA:CPU's strided 3D convolutions made this tiny network cost more per step
than the whole demo STT-UNET (1.05 s of 1.81 s, measured).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from stt_jax.models import layers


class StridedConv(nn.Module):
  """3x3x3 conv, zero padding 1, strides (sz, 2, 2). [b, d, h, w, c]."""
  features: int
  strides: tuple[int, int, int]
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    y = layers.conv3d(x, kernel.astype(self.dtype), self.strides, self.impl)
    return y + bias.astype(self.dtype)


class Discriminator(nn.Module):
  features: tuple[int, int] = (32, 64)
  impl: str = "auto"                    # layers.conv3d implementation
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, mask: jax.Array) -> jax.Array:
    """image, mask: [b, d, h, w, 1] -> region logits [b, d', h/4, w/4, 1]."""
    x = jnp.concatenate([image, mask], axis=-1).astype(self.dtype)
    depth = x.shape[1]
    impl = layers.resolve_conv_impl(self.impl, min(self.features))
    for i, width in enumerate(self.features):
      stride_z = 2 if depth >= 4 else 1
      depth = -(-depth // stride_z)
      x = StridedConv(width, (stride_z, 2, 2), impl=impl, dtype=self.dtype,
                      name=f"conv{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (1, 1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)
