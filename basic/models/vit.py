"""Vision Transformer image tower (Dosovitskiy et al. 2021), big_vision-style.

[B, H, W, 3] float images -> [B, width] pooled features. The patch grid, and with it the
learned position embedding's shape, follows the input size at init.

Token reduction (FLIP, CLIPA): in training (`train=True`) the patch tokens of each example may be
masked after the position embedding is added; only the K = round((1 - mask_ratio) * T) kept
tokens (in their original order, plus the class token with pool='cls') enter the Transformer, so
compute really drops. Evaluation (`train=False`) always sees every token. Masks are drawn from
the 'dropout' rng stream (the train step's rng), so a gradient-cached step, which recomputes
each microbatch with its own rng, sees the same mask in both of its passes and stays exact.

OpenAI CLIP / OpenCLIP layout (`ln_pre=True, patch_bias=False, pool='cls'`, activation
'quick_gelu' or 'gelu', norm_eps 1e-5): CLIP adds `positional_embedding[0]` to its class token
and `positional_embedding[1:]` to the patches; here the class token `cls` holds
class_embedding + positional_embedding[0] (it has no position entry of its own) and
`pos_embedding` the patches' rows. `ln_pre` normalises every token (class token included) before
the Transformer; CLIP's `ln_post` is the encoder's final LayerNorm (per token, so before or after
taking the class token is the same). Defaults keep the original numerics.
Kinds (`MASK_KINDS`, field `mask` = {'kind', 'ratio', 'cell'}), all keeping exactly K tokens
per example:
  'random': K positions uniformly at random.
  'grid':   the grid cut into `mask_cell` x `mask_cell` cells, one random position per cell
            kept first (CLIPA's grid masking: ratio 0.75 with cells of 2 keeps one per 2x2).
  'block':  whole `mask_cell` x `mask_cell` cells dropped in random order (an aligned-square
            simplification of BEiT's block masking; a cell may be partly dropped to hit K).
"""
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from basic.models import transformer

MASK_KINDS = ('none', 'random', 'grid', 'block')
MASK_OFF = flax.core.FrozenDict(kind='none', ratio=0.0, cell=2)

# big_vision's ViT sizes (big_vision/models/vit.py `decode_variant`): name -> (width, depth,
# mlp_dim, num_heads); a variant is '<name>/<patch size>', e.g. 'B/16'.
VARIANTS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
}
_SIZES = ('patch_size', 'width', 'depth', 'num_heads', 'mlp_dim')


def variant_spec(variant: str = '', **sizes) -> dict:
  """'B/16' -> dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072);
  variant '' -> the explicit `sizes` (patch_size, width, depth, num_heads, mlp_dim; all > 0).
  ValueError naming what is wrong."""
  if not variant:
    spec = {k: sizes.get(k, 0) for k in _SIZES}
    unset = [k for k, v in spec.items() if not v]
    if unset:
      raise ValueError(f'ViT without a variant needs the sizes {unset} (> 0).')
    return spec
  name, _, patch = variant.partition('/')
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f'ViT variant {variant!r}: "<size>/<patch>" with a size in '
                     f'{sorted(VARIANTS)}, e.g. "B/16".')
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(patch_size=int(patch), width=width, depth=depth, num_heads=num_heads,
              mlp_dim=mlp_dim)


def num_kept(num_tokens: int, ratio: float) -> int:
  """K = round((1 - ratio) * T), at least 1: the patch tokens kept per example."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'model.image.mask.ratio must be in [0, 1), got {ratio}.')
  return max(1, int(np.floor((1.0 - ratio) * num_tokens + 0.5)))


def mask_indices(rng, batch: int, grid_h: int, grid_w: int, kind: str, ratio: float,
                 cell: int = 2) -> jnp.ndarray:
  """Positions of the kept patch tokens: [batch, K] int32, ascending per example.

  Positions index the row-major grid_h x grid_w patch grid (as the ViT's token sequence).
  A different draw per example; a function of `rng` only.
  """
  t = grid_h * grid_w
  k = num_kept(t, ratio)
  noise = jax.random.uniform(rng, (batch, t))     # In [0, 1): ties broken at random.
  if kind == 'random':
    score = noise
  elif kind in ('grid', 'block'):
    if cell < 1:
      raise ValueError(f'model.image.mask.cell must be >= 1, got {cell}.')
    y, x = np.mgrid[:grid_h, :grid_w]
    cells_w = -(-grid_w // cell)
    cell_id = ((y // cell) * cells_w + x // cell).reshape(-1)          # [T]
    num_cells = int(cell_id.max()) + 1
    cell_rng = jax.random.fold_in(rng, 1)
    if kind == 'grid':
      # One position per cell, at a random offset, comes first (score < 1), the rest after.
      offset = jax.random.randint(cell_rng, (batch, num_cells), 0, cell * cell)
      local = ((y % cell) * cell + x % cell).reshape(-1)                # [T]
      primary = offset[:, cell_id] == local[None]
      score = noise + jnp.where(primary, 0.0, 1.0)
    else:
      # Cells in a random order (integer rank), positions within a cell in random order.
      rank = jnp.argsort(jnp.argsort(jax.random.uniform(cell_rng, (batch, num_cells)), -1), -1)
      score = rank[:, cell_id].astype(jnp.float32) + noise
  else:
    raise ValueError(f'Unknown model.image.mask.kind {kind!r}; one of {MASK_KINDS}.')
  keep = jnp.argsort(score, axis=-1)[:, :k]
  return jnp.sort(keep, axis=-1).astype(jnp.int32)


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
  """ViT encoder. __call__: images [B, H, W, C] float -> [B, width].

  Sizes: `variant` ('B/16': a VARIANTS row and the patch size), or '' and the explicit
  patch_size, width, depth, num_heads and mlp_dim (`variant_spec`).
  """
  variant: str = ''          # 'B/16', 'H/14', ... (VARIANTS); '' = the explicit sizes below,
  patch_size: int = 0        # which are 0 (unset) with a variant.
  width: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_dim: int = 0
  pool: str = 'gap'          # 'gap' (mean over patch tokens) | 'cls' (class token).
  posemb: str = 'learn'      # 'learn' | 'sincos2d'.
  dropout: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  # Training-time token masking (CLIPA): kind (one of MASK_KINDS), ratio of the patch tokens
  # dropped, cell side in patches for 'grid' / 'block'. Keys left out take MASK_OFF's values.
  mask: Mapping[str, Any] = MASK_OFF
  activation: str = transformer.DEFAULT_ACTIVATION   # MLP non-linearity (transformer.ACTIVATIONS).
  norm_eps: float = transformer.DEFAULT_NORM_EPS     # Every LayerNorm's epsilon.
  ln_pre: bool = False       # LayerNorm over all tokens before the Transformer (CLIP's ln_pre).
  patch_bias: bool = True    # Bias of the patch-embedding convolution (CLIP has none).
  scan_layers: bool = False  # One nn.scan over the Transformer blocks (basic.models.scan).

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images [B, H, W, C] -> [B, width]; with train and a mask, from K of the T patch tokens.

    The kept positions [B, K] are sown as intermediates 'kept' (for tests and inspection).
    """
    sizes = variant_spec(self.variant, patch_size=self.patch_size, width=self.width,
                         depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim)
    mask = {**MASK_OFF, **self.mask}
    p, width = sizes['patch_size'], sizes['width']
    x = nn.Conv(width, (p, p), strides=(p, p), padding='VALID', use_bias=self.patch_bias,
                dtype=self.dtype, name='embedding')(images)
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
    if mask['kind'] not in MASK_KINDS:
      raise ValueError(f'Unknown model.image.mask.kind {mask["kind"]!r}; one of {MASK_KINDS}.')
    if train and mask['kind'] != 'none' and mask['ratio'] > 0:
      keep = mask_indices(self.make_rng('dropout'), b, gh, gw, mask['kind'], mask['ratio'],
                          mask['cell'])
      self.sow('intermediates', 'kept', keep)
      x = jnp.take_along_axis(x, keep[..., None], axis=1)      # [B, K, D]
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    elif self.pool != 'gap':
      raise ValueError(f'Unknown ViT pool {self.pool!r}.')
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_pre')(x)
    x = nn.Dropout(self.dropout)(x, not train)
    x = transformer.Encoder(sizes['depth'], sizes['num_heads'], sizes['mlp_dim'], self.dropout,
                            self.remat, self.dtype, self.activation, self.norm_eps,
                            scan_layers=self.scan_layers, name='encoder')(x, train=train)
    return x[:, 0] if self.pool == 'cls' else x.mean(axis=1)


Model = ViT

# Rules on paths inside the tower (basic.models): the Encoder's, plus the patch embedding and the
# position embedding, whose width is split as the tokens' is not.
SHARDING_RULES = transformer.SHARDING_RULES + (
    (r'^embedding/kernel$', (None, None, None, 'model')),   # [p, p, 3, D]
    (r'^pos_embedding$', (None, None, 'model')),            # [1, T, D]
)
POOLS = ('gap', 'cls')
POSEMBS = ('learn', 'sincos2d')


def validate(config, field: str = 'model.image'):
  """config.<field> of a ViT (see basic.models): sizes, Encoder fields, patching, masking."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top  (config_lib reads models)
  variant = config_lib.check_str(config, f'{field}.variant')
  if variant:
    try:
      patch = variant_spec(variant)['patch_size']
    except ValueError as e:
      config_lib.fail(f'{field}.variant', variant, str(e))
    config_lib.check_sizes_unset(config, field, variant, _SIZES)
  else:
    patch = config_lib.check_int(config, f'{field}.patch_size', 1)
  image_size = config.data.image_size
  if image_size % patch:
    config_lib.fail(f'{field}.variant' if variant else f'{field}.patch_size',
                    variant or patch, f'the patch size must divide config.data.image_size='
                    f'{image_size}.')
  transformer.validate_encoder(config, field, POOLS, sizes=not variant)
  config_lib.check_choice(config, f'{field}.posemb', POSEMBS)
  config_lib.check_bool(config, f'{field}.ln_pre')
  config_lib.check_bool(config, f'{field}.patch_bias')
  config_lib.check_choice(config, f'{field}.mask.kind', MASK_KINDS)
  ratio = config_lib.get_field(config, f'{field}.mask.ratio')
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
    config_lib.fail(f'{field}.mask.ratio', ratio, 'must be in [0, 1).')
  config_lib.check_int(config, f'{field}.mask.cell', 1)
