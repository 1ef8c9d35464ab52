"""Vision Transformer image tower (Dosovitskiy et al. 2021), big_vision-style.

[B, H, W, 3] float images -> [B, width] pooled features. The patch grid, and with it the
learned position embedding's shape, follows the input size at init.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from basic.models import transformer


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.):
  """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision). -> [1, grid_h*grid_w, width]."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got {width}.')
  y, x = np.mgrid[:grid_h, :grid_w]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(emb[None], jnp.float32)


class ViT(nn.Module):
  """ViT encoder. __call__: images [B, H, W, C] float -> [B, width]."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pool: str = 'gap'          # 'gap' (mean over patch tokens) | 'cls' (class token).
  posemb: str = 'learn'      # 'learn' | 'sincos2d'.
  dropout: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='embedding')(images)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.posemb == 'learn':
      pos = self.param('pos_embedding', nn.initializers.normal(stddev=1 / np.sqrt(d)),
                       (1, gh * gw, d), jnp.float32)
    elif self.posemb == 'sincos2d':
      pos = sincos_2d(gh, gw, d)
    else:
      raise ValueError(f'Unknown ViT posemb {self.posemb!r}.')
    x = x + pos.astype(x.dtype)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    elif self.pool != 'gap':
      raise ValueError(f'Unknown ViT pool {self.pool!r}.')
    x = nn.Dropout(self.dropout)(x, not train)
    x = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout,
                            self.remat, self.dtype, name='encoder')(x, train=train)
    return x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
