"""Denoising (interpolation) front-end: kernel-prediction interpolation.

For every slice t a small 2D CNN looks at slices (t-1, t, t+1) and predicts,
per pixel, a k x k kernel for slice t-1 and one for slice t+1 (jointly
softmax-normalised, so they interpolate rather than rescale). Applying them to
the adjacent slices and adding the results gives the restored slice, as in the
kernel-prediction restoration of ssTEM (the paper's ref. [7]). A per-pixel gate
mixes it with the observed slice: out = (1 - g) x_t + g restored, so a clean
slice can pass through while a missing or blurred one is rebuilt from its
neighbours. The gate starts near 0 (bias -4): a fresh front-end passes the
image through almost unchanged. First and last slices use themselves as the
missing neighbour.
Input and output: [batch, depth, height, width, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from stt_jax.models import layers


def _neighbourhoods(planes: jax.Array, k: int) -> jax.Array:
  """[n, h, w] -> [n, h, w, k*k] edge-padded k x k neighbourhoods, row-major."""
  r = k // 2
  padded = layers.edge_pad(planes, ((0, 0), (r, r), (r, r)))
  h, w = planes.shape[1:]
  return jnp.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)],
                   axis=-1)


class InterpolationDenoiser(nn.Module):
  kernel_size: int = 5
  features: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    b, t, h, w, _ = image.shape
    k2 = self.kernel_size ** 2
    x = image[..., 0]
    prev = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
    nxt = jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)
    stack = jnp.stack([prev, x, nxt], axis=-1).reshape(b * t, h, w, 3)
    f = stack.astype(self.dtype)
    for i in range(2):
      f = layers.elu(nn.Conv(self.features, (3, 3), dtype=self.dtype, name=f"conv{i}")(f))
    head = nn.Conv(2 * k2 + 1, (3, 3), dtype=self.dtype, name="kernels",
                   kernel_init=nn.initializers.zeros,
                   bias_init=lambda key, shape, dtype: jnp.zeros(shape, dtype).at[-1].set(-4.0)
                   )(f).astype(jnp.float32)
    weights = jax.nn.softmax(head[..., :2 * k2], axis=-1)
    gate = jax.nn.sigmoid(head[..., -1])
    prev_n = _neighbourhoods(prev.reshape(b * t, h, w), self.kernel_size)
    next_n = _neighbourhoods(nxt.reshape(b * t, h, w), self.kernel_size)
    restored = (jnp.sum(weights[..., :k2] * prev_n, axis=-1)
                + jnp.sum(weights[..., k2:] * next_n, axis=-1))
    out = (1 - gate) * x.reshape(b * t, h, w) + gate * restored
    return out.reshape(b, t, h, w, 1).astype(image.dtype)
