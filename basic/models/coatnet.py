"""CoAtNet image tower (Dai et al. 2021, "CoAtNet: Marrying Convolution and Attention").

[B, H, W, 3] float images -> [B, width] pooled features (global average pool + LayerNorm), so
the DualEncoder's projection follows. Stages (paper Section 3.2, Table 3):

  S0  stem: 3x3 conv stride 2 -> norm -> GELU -> 3x3 conv             (H/2)
  S1, S2  MBConv blocks: expansion 4, depthwise 3x3, squeeze-excitation (H/4, H/8)
  S3, S4  Transformer blocks with 2-D relative attention              (H/16, H/32)

Every block is pre-norm (`x + f(Norm(x))`). The first block of each stage downsamples
(Section 3.2, "x <- Proj(Pool(x)) + Conv(DepthConv(Conv(Norm(x), stride=2)))" for MBConv and
"x <- Proj(Pool(x)) + Attention(Pool(Norm(x)))" for Transformer blocks): the shortcut is a 2x2
max-pool and a 1x1 projection; the MBConv residual uses a stride-2 depthwise conv, the
Transformer residual a 2x2 max-pool before attention. Relative attention adds a learned bias
per head, a table of (2H-1) x (2W-1) entries indexed by the 2-D offset between query and key.

Choices where the paper is not explicit (they matter for the parameter count only). They
follow timm's paper-matching CoAtNet configs (`timm/models/maxxvit.py`, `coatnet_0`..`coatnet_5`,
aligned with the authors' public MaxViT code; its `_rw_coat_cfg` comment lists "mbconv expansion
calculated from input instead of output chs" as a difference of timm's own variants):
- MBConv expansion counts from the block's *output* channels (hidden = 4 x features) and the
  squeeze-excitation bottleneck is 0.25 x the output channels. Attention heads have `head_dim`
  channels (32 for CoAtNet-0..4, 64 for 5, 128 for 6/7), their count = the stage width / head_dim.
- Biases on the linear layers that feed a residual sum, none on convs followed by a norm.
With these, CoAtNet-0..5 and 7 plus the classifier the paper counts (timm's paper configs: a
pre-logits Linear(D4, D4) + tanh, then the 1000-way layer; tests/test_coatnet.py) come within 0.6%
of the published sizes. The pre-logits layer belongs to the classifier and is not built here:
the DualEncoder's projection follows the pooled features.

NORMALISATION: the paper uses BatchNorm in the stem and MBConv blocks and LayerNorm in the
Transformer blocks. BatchNorm is replaced here by LayerNorm over channels everywhere, because
batch statistics are computed per microbatch under gradient caching (`basic.gradcache`): with
BatchNorm a K-microbatch step would not equal the full-batch step, and the model's output
would depend on the batch it is evaluated in. LayerNorm has per-example statistics only, so a
gradient-cached step is exact. Effect vs the paper: the same parameter count up to the
BatchNorm moving statistics (non-trainable, 2 per channel, absent here); ConvNeXt shows conv
nets train as well with LayerNorm, but ImageNet numbers of the paper are not reproduced here.

Stochastic depth (drop path) drops each block's residual branch per example with a rate
rising linearly from 0 at the first block to `drop_path` at the last (rng stream 'dropout':
block l, counted over the tower, uses fold_in(k, l) of one key k, see `basic.models.scan`).
Every block can be rematerialised with a `basic.models.transformer.REMAT_POLICIES` policy.
With `scan_layers`, the blocks after each stage's first (downsampling) one run as one `nn.scan`
over stacked parameters: 'stage3_block00' stays, 'stage3_block01'.. become 'stage3_block_scan'.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from basic.models import scan as scan_lib
from basic.models import transformer

# name -> (stem width D0, blocks per stage, widths per stage, block types, strides, head dim).
# 'C' = MBConv, 'T' = Transformer with relative attention.
VARIANTS = {
    # CoAtNet paper, model instantiations (L = blocks, D = widths of S1..S4, D0 for the stem).
    # CoAtNet-0..5 agree with timm's paper configs (timm/models/maxxvit.py, coatnet_0..5).
    'coatnet-0': (64, (2, 3, 5, 2), (96, 192, 384, 768), 'CCTT', (2, 2, 2, 2), 32),
    'coatnet-1': (64, (2, 6, 14, 2), (96, 192, 384, 768), 'CCTT', (2, 2, 2, 2), 32),
    'coatnet-2': (128, (2, 6, 14, 2), (128, 256, 512, 1024), 'CCTT', (2, 2, 2, 2), 32),
    'coatnet-3': (192, (2, 6, 14, 2), (192, 384, 768, 1536), 'CCTT', (2, 2, 2, 2), 32),
    'coatnet-4': (192, (2, 12, 28, 2), (192, 384, 768, 1536), 'CCTT', (2, 2, 2, 2), 32),
    # CoAtNet paper Table 9 (JFT-3B models): CoAtNet-5 widens S2..S4, head size 64.
    'coatnet-5': (192, (2, 12, 28, 2), (256, 512, 1280, 2048), 'CCTT', (2, 2, 2, 2), 64),
    # CoAtNet-6/7 (JFT-3B models): S3 is split into 8 MBConv blocks then 42 Transformer blocks
    # of twice the width at the same resolution (stride 1); head size 128. CoAtNet-6 as read here
    # (S4 = 2048) counts 1.35B against the published 1.47B; with S4 = 3072 (as CoAtNet-7) it would
    # count 1.471B (tests/test_coatnet.py keeps it an xfail, see there).
    'coatnet-6': (192, (2, 4, 8, 42, 2), (192, 384, 768, 1536, 2048), 'CCCTT',
                  (2, 2, 2, 1, 2), 128),
    'coatnet-7': (192, (2, 4, 8, 42, 2), (256, 512, 1024, 2048, 3072), 'CCCTT',
                  (2, 2, 2, 1, 2), 128),
}
BLOCK_TYPES = ('C', 'T')


_SIZES = ('stem_dim', 'depths', 'dims', 'block_types', 'strides', 'head_dim')


def variant_spec(variant: str = '', **sizes) -> dict:
  """-> dict(stem_dim, depths, dims, block_types, strides, head_dim).

  `variant` names a row of VARIANTS; '' reads the explicit `sizes` of the same names instead
  (small test models; strides () = 2 at every stage).
  """
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f'CoAtNet variant {variant!r}: one of {sorted(VARIANTS)} or "" (explicit '
                       'stem_dim, depths, dims, block_types, strides, head_dim).')
    stem_dim, depths, dims, block_types, strides, head_dim = VARIANTS[variant]
  else:
    stem_dim, depths, dims = sizes.get('stem_dim', 0), sizes.get('depths'), sizes.get('dims')
    block_types, head_dim = sizes.get('block_types'), sizes.get('head_dim', 0)
    strides = sizes.get('strides') or (2,) * len(depths or ())
  return dict(stem_dim=stem_dim, depths=tuple(depths or ()), dims=tuple(dims or ()),
              block_types=''.join(block_types or ''), strides=tuple(strides), head_dim=head_dim)


def relative_position_index(height: int, width: int) -> np.ndarray:
  """[H*W, H*W] int index into a (2H-1)*(2W-1) table of 2-D offsets (query - key)."""
  coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing='ij'))
  coords = coords.reshape(2, -1)                                       # [2, HW]
  rel = coords[:, :, None] - coords[:, None, :]                        # [2, HW, HW]
  return (rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)


def _max_pool(x):
  """2x2 max-pool, stride 2 ('SAME' padding for odd sizes). [B, H, W, C] -> [B, H/2, W/2, C]."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')


def _remat(block_cls, policy_name: str, prevent_cse: bool = True):
  """`block_cls` under `nn.remat` with a `transformer.REMAT_POLICIES` policy ('none' = as is).

  Blocks here are called as `block(x, deterministic, rng, rate)`; nn.remat counts `self` as
  argument 0, so the Python bool `deterministic` (static for the remat trace) is argument 2.
  """
  if policy_name not in transformer.REMAT_POLICIES:
    raise ValueError(f'config.model.image.remat={policy_name!r}: one of '
                     f'{sorted(transformer.REMAT_POLICIES)}.')
  if policy_name == 'none':
    return block_cls
  return nn.remat(block_cls, policy=transformer.REMAT_POLICIES[policy_name], static_argnums=(2,),
                  prevent_cse=prevent_cse)


def drop_path(x, rate, rng, deterministic: bool):
  """Stochastic depth: x [B, ...] with each example's whole x zeroed with probability `rate`,
  kept ones scaled by 1 / (1 - rate) (flax nn.Dropout with one draw per example).

  `rate`: a Python float or a float32 scalar array (a scanned layer's rate); the same float32
  arithmetic either way, so scanned and unscanned blocks drop the same examples.
  """
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class DropPath(nn.Module):
  """Stochastic depth (`drop_path`) at `rate`, or at the call's `rate` when given (an array for
  a scanned layer); key `rng`, or one from the 'dropout' stream when None."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None, rate=None):
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    return drop_path(x, rate, self.make_rng('dropout') if rng is None else rng, deterministic)


def _shortcut(x, features, stride, dtype):
  """Identity, or Proj(Pool(x)) when the block changes resolution or width."""
  if stride > 1:
    x = _max_pool(x)
  if stride > 1 or x.shape[-1] != features:
    x = nn.Dense(features, dtype=dtype, name='shortcut_proj')(x)
  return x


class MBConvBlock(nn.Module):
  """x + DropPath(Conv1x1(SE(DWConv3x3(Conv1x1(LN(x)))))), downsampling in the depthwise conv.

  [B, H, W, Cin] -> [B, H/stride, W/stride, features].
  """
  features: int
  stride: int = 1
  expansion: int = 4
  se_ratio: float = 0.25
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None, rate=None):
    """rng: the drop-path key (None: from the 'dropout' stream); rate: overrides drop_path."""
    shortcut = _shortcut(x, self.features, self.stride, self.dtype)
    mid = self.features * self.expansion          # Expansion from the output channels.
    y = nn.LayerNorm(dtype=self.dtype, name='ln_pre')(x)
    y = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype, name='expand')(y)
    y = nn.gelu(nn.LayerNorm(dtype=self.dtype, name='ln_expand')(y))
    y = nn.Conv(mid, (3, 3), strides=self.stride, padding='SAME', feature_group_count=mid,
                use_bias=False, dtype=self.dtype, name='depthwise')(y)
    y = nn.gelu(nn.LayerNorm(dtype=self.dtype, name='ln_depthwise')(y))
    # Squeeze-excitation: channel gates from the spatial mean.
    s = y.mean(axis=(1, 2), keepdims=True)
    s = nn.gelu(nn.Dense(max(1, int(self.features * self.se_ratio)), dtype=self.dtype,
                         name='se_reduce')(s))
    y = y * nn.sigmoid(nn.Dense(mid, dtype=self.dtype, name='se_expand')(s))
    y = nn.Conv(self.features, (1, 1), dtype=self.dtype, name='project')(y)
    return shortcut + DropPath(self.drop_path)(y, deterministic, rng, rate)


class RelativeAttention(nn.Module):
  """Multi-head self-attention over an H x W grid with a learned 2-D relative position bias.

  [B, H, W, Cin] -> [B, H, W, num_heads * head_dim]. Parameters: qkv [Cin, 3, heads, head_dim],
  out [heads, head_dim, D] (heads on their own axis, for tensor parallelism), and the bias
  table [(2H-1)*(2W-1), heads], fixed to the grid size seen at init.
  """
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    qkv = nn.DenseGeneral((3, self.num_heads, self.head_dim), dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                 # [B, T, heads, hd]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(self.head_dim).astype(np.float32)
    table = self.param('relative_bias', nn.initializers.normal(0.02),
                       ((2 * h - 1) * (2 * w - 1), self.num_heads), jnp.float32)
    bias = table[relative_position_index(h, w)]                          # [T, T, heads]
    logits = logits + jnp.transpose(bias, (2, 0, 1))[None].astype(logits.dtype)
    attn = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, h, w, self.num_heads, self.head_dim)
    return nn.DenseGeneral(self.num_heads * self.head_dim, axis=(-2, -1), dtype=self.dtype,
                           name='out')(y)


class TransformerBlock(nn.Module):
  """x = Proj(Pool(x)) + DropPath(RelAttn(Pool(LN(x)))); x + DropPath(MLP(LN(x))).

  [B, H, W, Cin] -> [B, H/stride, W/stride, features]; MLP expansion `mlp_ratio`, GELU.
  """
  features: int
  head_dim: int
  stride: int = 1
  mlp_ratio: int = 4
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None, rate=None):
    """rng: key of the two drop paths (fold_in 0, 1; None: from the 'dropout' stream); rate:
    overrides drop_path."""
    if self.features % self.head_dim:
      raise ValueError(f'CoAtNet Transformer width {self.features} is not a multiple of '
                       f'config.model.image head_dim={self.head_dim}.')
    shortcut = _shortcut(x, self.features, self.stride, self.dtype)
    y = nn.LayerNorm(dtype=self.dtype, name='ln_attn')(x)
    if self.stride > 1:
      y = _max_pool(y)
    y = RelativeAttention(self.features // self.head_dim, self.head_dim, self.dtype,
                          name='attn')(y)
    x = shortcut + DropPath(self.drop_path)(y, deterministic, scan_lib.fold(rng, 0), rate)
    y = nn.LayerNorm(dtype=self.dtype, name='ln_mlp')(x)
    y = nn.gelu(nn.Dense(self.features * self.mlp_ratio, dtype=self.dtype, name='mlp_in')(y))
    y = nn.Dense(self.features, dtype=self.dtype, name='mlp_out')(y)
    return x + DropPath(self.drop_path)(y, deterministic, scan_lib.fold(rng, 1), rate)


class CoAtNet(nn.Module):
  """CoAtNet encoder. __call__: images [B, H, W, 3] float -> [B, dims[-1]].

  H and W must be multiples of 2 ** (1 + number of stride-2 stages) (32 for CoAtNet-0..7).
  """
  variant: str = ''          # 'coatnet-0'.. (VARIANTS); '' = the explicit sizes below, which
  stem_dim: int = 0          # are 0 / () / '' (unset) with a variant (`variant_spec`).
  depths: Sequence[int] = ()
  dims: Sequence[int] = ()
  block_types: str = ''      # Per stage: 'C' (MBConv) or 'T' (Transformer).
  strides: Sequence[int] = ()   # Per stage; () = all 2.
  head_dim: int = 0
  expansion: int = 4
  se_ratio: float = 0.25
  drop_path: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False   # Scan the blocks after each stage's first (basic.models.scan).

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    spec = variant_spec(self.variant, **{k: getattr(self, k) for k in _SIZES})
    depths, dims, block_types, strides = (spec['depths'], spec['dims'], spec['block_types'],
                                          spec['strides'])
    if not len(depths) == len(dims) == len(block_types) == len(strides):
      raise ValueError(f'CoAtNet: depths {depths}, dims {dims}, block_types {block_types!r} and '
                       f'strides {strides} must have equal lengths.')
    x = nn.Conv(spec['stem_dim'], (3, 3), strides=2, padding='SAME', use_bias=False,
                dtype=self.dtype, name='stem_conv1')(images)
    x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name='stem_ln')(x))
    x = nn.Conv(spec['stem_dim'], (3, 3), padding='SAME', dtype=self.dtype,
                name='stem_conv2')(x)
    head_dim = spec['head_dim']

    total = sum(depths)
    rates = [self.drop_path * i / max(total - 1, 1) for i in range(total)]  # 0 at the first.
    rng = self.make_rng('dropout') if train and self.drop_path > 0 else None
    index = 0
    for s, (depth, dim, kind, stride) in enumerate(zip(depths, dims, block_types, strides)):
      if kind not in BLOCK_TYPES:
        raise ValueError(f'CoAtNet block type {kind!r}: one of {BLOCK_TYPES}.')

      def make(i, rate, name, prevent_cse=True, kind=kind, dim=dim, stride=stride):
        block_stride = stride if i == 0 else 1
        if kind == 'C':
          return _remat(MBConvBlock, self.remat, prevent_cse)(
              dim, block_stride, self.expansion, self.se_ratio, rate, self.dtype, name=name)
        return _remat(TransformerBlock, self.remat, prevent_cse)(
            dim, head_dim, block_stride, self.expansion, rate, self.dtype, name=name)

      prefix = f'stage{s + 1}_block'
      unscanned = min(depth, 1) if self.scan_layers else depth
      for i in range(unscanned):
        x = make(i, rates[index], scan_lib.block_name(prefix, i))(
            x, not train, scan_lib.layer_rng(rng, index))
        index += 1
      if depth > unscanned:   # Blocks 1.. of the stage: stride 1, equal shapes, one scan.
        n = depth - unscanned
        stage_rates = (None if self.drop_path == 0 else
                       jnp.asarray(rates[index:index + n], jnp.float32))
        x = scan_lib.scan_blocks(
            make(1, 0.0, scan_lib.scan_name(prefix), prevent_cse=False), x,
            (scan_lib.layer_rngs(rng, index, n), stage_rates), n,
            lambda mdl, y, xs: mdl(y, not train, *xs))
        index += n
    x = x.mean(axis=(1, 2))
    return nn.LayerNorm(dtype=self.dtype, name='ln_final')(x)


Model = CoAtNet

# Rules on paths inside the tower (basic.models), Megatron-style over 'model'. Transformer
# blocks: heads and MLP hidden units; MBConv blocks: the expanded channels.
SHARDING_RULES = (
    (r'attn/qkv/kernel$', (None, None, 'model', None)),   # [Cin, 3, heads, head_dim]
    (r'attn/qkv/bias$', (None, 'model', None)),           # [3, heads, head_dim]
    (r'attn/out/kernel$', ('model', None, None)),         # [heads, head_dim, D]
    (r'attn/relative_bias$', (None, 'model')),            # [(2H-1)(2W-1), heads]
    (r'mlp_in/kernel$', (None, 'model')),                 # [D, 4D]
    (r'mlp_in/bias$', ('model',)),                        # [4D]
    (r'mlp_out/kernel$', ('model', None)),                # [4D, D]
    (r'/expand/kernel$', (None, None, None, 'model')),    # [1, 1, C, 4C] (not se_expand)
    (r'ln_expand/(scale|bias)$', ('model',)),             # [4C]
    (r'depthwise/kernel$', (None, None, None, 'model')),  # [3, 3, 1, 4C]
    (r'ln_depthwise/(scale|bias)$', ('model',)),          # [4C]
    (r'se_reduce/kernel$', ('model', None)),              # [4C, C]
    (r'se_expand/kernel$', (None, 'model')),              # [C, 4C]
    (r'se_expand/bias$', ('model',)),                     # [4C]
    (r'project/kernel$', (None, None, 'model', None)),    # [1, 1, 4C, D]
    (r'shortcut_proj/kernel$', (None, 'model')),          # [Cin, D]
    (r'^stem_conv\d/kernel$', (None, None, None, 'model')),  # [3, 3, Cin, D0]
)


def validate(config, field: str = 'model.image'):
  """config.<field> of a CoAtNet (see basic.models): a named variant or explicit stage fields."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top  (config_lib reads models)
  cfg = config_lib.get_field(config, field)
  variant = config_lib.check_str(config, f'{field}.variant')
  if variant:
    config_lib.check_choice(config, f'{field}.variant', tuple(VARIANTS))
    config_lib.check_sizes_unset(config, field, variant, _SIZES)
  else:
    config_lib.check_int(config, f'{field}.stem_dim', 1)
    config_lib.check_int(config, f'{field}.head_dim', 1)
    n = len(config_lib.get_field(config, f'{field}.depths'))
    for key in ('depths', 'dims', 'block_types') + (('strides',) if cfg.strides else ()):
      value = cfg[key]
      if len(value) != n or not n:
        config_lib.fail(f'{field}.{key}', value,
                        f'must have one entry per stage, as {field}.depths ({n}).')
    for key in ('depths', 'dims'):
      if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cfg[key]):
        config_lib.fail(f'{field}.{key}', cfg[key], 'entries must be integers >= 1.')
    if any(t not in BLOCK_TYPES for t in cfg.block_types):
      config_lib.fail(f'{field}.block_types', cfg.block_types,
                      f'entries must be one of {list(BLOCK_TYPES)}.')
    if any(s not in (1, 2) for s in cfg.strides):
      config_lib.fail(f'{field}.strides', cfg.strides, 'entries must be 1 or 2.')
    for dim, kind in zip(cfg.dims, cfg.block_types):
      if kind == 'T' and dim % cfg.head_dim:
        config_lib.fail(f'{field}.head_dim', cfg.head_dim,
                        f'must divide the Transformer stage widths in {field}.dims={cfg.dims}.')
  spec = variant_spec(variant, **{k: cfg[k] for k in _SIZES})
  reduction = 2 ** (1 + sum(s == 2 for s in spec['strides']))
  image_size = config.data.image_size
  if image_size % reduction:
    config_lib.fail('data.image_size', image_size,
                    f'must be a multiple of {reduction} (the CoAtNet stem and stride-2 stages).')
  transformer.check_rate(config, f'{field}.drop_path')
  config_lib.check_choice(config, f'{field}.remat', tuple(transformer.REMAT_POLICIES))
  config_lib.check_int(config, f'{field}.expansion', 1)
  config_lib.check_positive(config, f'{field}.se_ratio')
  config_lib.check_bool(config, f'{field}.scan_layers')
