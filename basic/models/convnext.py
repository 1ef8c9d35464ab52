"""ConvNeXt image tower (Liu et al. 2022, "A ConvNet for the 2020s"), as timm defines it.

[B, H, W, 3] float images -> [B, dims[-1]] pooled features: global average pool -> LayerNorm.
The DualEncoder's `image_proj` (Dense, no bias) follows, so tower + `image_proj` is OpenCLIP's
`TimmModel` for ConvNeXt: timm's trunk with its classifier removed (`reset_classifier(0)` keeps
`head.norm`, the LayerNorm after the pool) and `head.proj = nn.Linear(dims[-1], embed_dim,
bias=False)` (OpenCLIP `timm_model.py`, `timm_proj='linear'`, `proj_bias=False`). So the tower's
parameters are exactly timm's trunk without `head.fc`, and image tower + `image_proj` equals
OpenCLIP's image tower (846,543,744 parameters for `convnext_xxlarge` at embed_dim 1024).

Layers (timm `timm/models/convnext.py`, default `ConvNeXt` arguments: patch stem, no conv_mlp
difference in parameters, conv_bias=True, ls_init_value=1e-6, head_norm_first=False):

  stem    Conv patch_size x patch_size, stride patch_size (4) + bias -> LayerNorm   (H/4)
  stage s (s > 0 first: LayerNorm -> Conv 2x2 stride 2 + bias, dims[s-1] -> dims[s]) (H/4/2^s)
          then depths[s] blocks:
            x + DropPath(gamma * Linear(GELU(Linear(LN(DWConv7x7(x)), 4C)), C))
          DWConv: depthwise 7x7 with bias ('SAME' padding 3); GELU is exact (erf, torch's
          nn.GELU); gamma: layer scale, init 1e-6.
  head    mean over H, W -> LayerNorm                                              [B, C]

Every LayerNorm has `norm_eps` (timm: 1e-6 by default, `convnext_xxlarge` passes 1e-5). All
LayerNorms here are per example (no batch statistics), so gradient-cached steps are exact.

Stochastic depth (drop path) drops each block's residual branch per example, scaled by
1 / (1 - rate), with rates linear in the block index from 0 (first block) to `drop_path` (last)
over all sum(depths) blocks, as timm's `calculate_drop_path_rates` (torch.linspace(0, rate,
sum(depths))); rng stream 'dropout' (block l, counted over the tower, uses fold_in(k, l) of one
key k, see `basic.models.scan`). Every block can be rematerialised with a
`basic.models.transformer.REMAT_POLICIES` policy (OpenCLIP `--grad-checkpointing` checkpoints
the blocks of each stage). With `scan_layers`, the blocks after each stage's first one run as
one `nn.scan` over stacked parameters: 'stage2_block00' stays, 'stage2_block01'.. become
'stage2_block_scan' (as in CoAtNet, whose first blocks downsample).
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from basic.models import coatnet
from basic.models import scan as scan_lib
from basic.models import transformer

# name -> (depths per stage, widths per stage, LayerNorm epsilon); timm's `convnext_*` model
# functions (timm/models/convnext.py). atto..nano use conv_mlp=True (1x1 convs in the MLP and
# channels-first LayerNorms): the same parameters and the same function as Linear layers.
VARIANTS = {
    'convnext_atto': ((2, 2, 6, 2), (40, 80, 160, 320), 1e-6),
    'convnext_femto': ((2, 2, 6, 2), (48, 96, 192, 384), 1e-6),
    'convnext_pico': ((2, 2, 6, 2), (64, 128, 256, 512), 1e-6),
    'convnext_nano': ((2, 2, 8, 2), (80, 160, 320, 640), 1e-6),
    'convnext_tiny': ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    'convnext_small': ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    'convnext_base': ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    'convnext_large': ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    'convnext_xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    # timm: convnext_xxlarge(norm_eps=1e-5); the OpenCLIP model card's custom size.
    'convnext_xxlarge': ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}


_SIZES = ('depths', 'dims', 'norm_eps')


def variant_spec(variant: str = '', **sizes) -> dict:
  """-> dict(depths, dims, norm_eps).

  `variant` names a row of VARIANTS; '' reads the explicit `sizes` depths, dims and norm_eps
  instead (small test models).
  """
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f'ConvNeXt variant {variant!r}: one of {sorted(VARIANTS)} or "" '
                       '(explicit depths, dims, norm_eps).')
    depths, dims, norm_eps = VARIANTS[variant]
  else:
    depths, dims, norm_eps = sizes.get('depths'), sizes.get('dims'), sizes.get('norm_eps', 0.0)
    if not norm_eps:
      raise ValueError('ConvNeXt without a variant needs norm_eps > 0 (timm: 1e-6).')
  return dict(depths=tuple(depths or ()), dims=tuple(dims or ()), norm_eps=norm_eps)


def drop_path_rates(drop_path: float, depths: Sequence[int]):
  """Per-block rates, linear from 0 to `drop_path` over all sum(depths) blocks (timm)."""
  total = sum(depths)
  return [drop_path * i / max(total - 1, 1) for i in range(total)]


class ConvNeXtBlock(nn.Module):
  """x + DropPath(gamma * fc2(GELU(fc1(LN(DWConv(x)))))). [B, H, W, C] -> [B, H, W, C]."""
  kernel_size: int = 7
  mlp_ratio: int = 4
  layer_scale_init: float = 1e-6
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None, rate=None):
    """rng: the drop-path key (None: from the 'dropout' stream); rate: overrides drop_path."""
    dim = x.shape[-1]
    init = nn.initializers.truncated_normal(0.02)   # timm _init_weights: trunc_normal_(.02).
    k = self.kernel_size
    y = nn.Conv(dim, (k, k), padding='SAME', feature_group_count=dim, kernel_init=init,
                dtype=self.dtype, name='conv_dw')(x)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm')(y)
    y = nn.Dense(self.mlp_ratio * dim, kernel_init=init, dtype=self.dtype, name='mlp_fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(dim, kernel_init=init, dtype=self.dtype, name='mlp_fc2')(y)
    gamma = self.param('gamma', nn.initializers.constant(self.layer_scale_init), (dim,),
                       jnp.float32)
    y = y * gamma.astype(y.dtype)
    return x + coatnet.DropPath(self.drop_path)(y, deterministic, rng, rate)


class ConvNeXt(nn.Module):
  """ConvNeXt trunk + average pool + LayerNorm. __call__: [B, H, W, 3] float -> [B, dims[-1]].

  H and W must be multiples of patch_size * 2 ** (len(depths) - 1) (32 for the 4-stage sizes).
  """
  variant: str = ''          # 'convnext_base'.. (VARIANTS); '' = the explicit sizes below,
  depths: Sequence[int] = ()  # which are () / 0 (unset) with a variant (`variant_spec`).
  dims: Sequence[int] = ()
  norm_eps: float = 0.0      # Every LayerNorm's epsilon (timm: 1e-6; convnext_xxlarge 1e-5).
  patch_size: int = 4            # timm ConvNeXt(patch_size=4): 4x4 stride-4 patch stem.
  kernel_size: int = 7           # timm ConvNeXt(kernel_sizes=7): depthwise 7x7.
  mlp_ratio: int = 4             # timm ConvNeXtBlock(mlp_ratio=4).
  layer_scale_init: float = 1e-6  # timm ConvNeXt(ls_init_value=1e-6).
  drop_path: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False   # Scan the blocks after each stage's first (basic.models.scan).

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    spec = variant_spec(self.variant, depths=self.depths, dims=self.dims,
                        norm_eps=self.norm_eps)
    depths, dims, eps = spec['depths'], spec['dims'], spec['norm_eps']
    if len(depths) != len(dims):
      raise ValueError(f'ConvNeXt: depths {depths} and dims {dims} must have equal lengths.')
    init = nn.initializers.truncated_normal(0.02)
    p = self.patch_size
    x = nn.Conv(dims[0], (p, p), strides=(p, p), padding='VALID', kernel_init=init,
                dtype=self.dtype, name='stem_conv')(images)
    x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='stem_norm')(x)
    block_cls = transformer.maybe_remat(ConvNeXtBlock, self.remat, static_argnums=(2,))
    scanned_cls = transformer.maybe_remat(ConvNeXtBlock, self.remat, static_argnums=(2,),
                                          prevent_cse=False)
    rates = drop_path_rates(self.drop_path, depths)
    rng = self.make_rng('dropout') if train and self.drop_path > 0 else None
    index = 0
    for s, (depth, dim) in enumerate(zip(depths, dims)):
      if s > 0:
        x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name=f'stage{s}_downsample_norm')(x)
        x = nn.Conv(dim, (2, 2), strides=(2, 2), padding='VALID', kernel_init=init,
                    dtype=self.dtype, name=f'stage{s}_downsample_conv')(x)
      prefix = f'stage{s}_block'
      unscanned = min(depth, 1) if self.scan_layers else depth
      for i in range(unscanned):
        x = block_cls(self.kernel_size, self.mlp_ratio, self.layer_scale_init, eps,
                      rates[index], self.dtype, name=scan_lib.block_name(prefix, i))(
                          x, not train, scan_lib.layer_rng(rng, index))
        index += 1
      if depth > unscanned:
        n = depth - unscanned
        stage_rates = (None if self.drop_path == 0 else
                       jnp.asarray(rates[index:index + n], jnp.float32))
        block = scanned_cls(self.kernel_size, self.mlp_ratio, self.layer_scale_init,
                            eps, 0.0, self.dtype, name=scan_lib.scan_name(prefix))
        x = scan_lib.scan_blocks(block, x, (scan_lib.layer_rngs(rng, index, n), stage_rates), n,
                                 lambda mdl, y, xs: mdl(y, not train, *xs))
        index += n
    x = x.mean(axis=(1, 2))
    return nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='head_norm')(x)


Model = ConvNeXt

# Rules on paths inside the tower (basic.models), Megatron-style over 'model': the MLP hidden
# channels are split (fc1 column-parallel, fc2 and the downsampling convs row-parallel, one
# all-reduce each); depthwise and stem kernels act on replicated activations and are stated
# replicated (at most 150,528 elements: under fsdp_min_size, so FSDP leaves them whole too).
SHARDING_RULES = (
    (r'mlp_fc1/kernel$', (None, 'model')),                        # [C, 4C]
    (r'mlp_fc1/bias$', ('model',)),                               # [4C]
    (r'mlp_fc2/kernel$', ('model', None)),                        # [4C, C]
    (r'downsample_conv/kernel$', (None, None, 'model', None)),    # [2, 2, Cin, Cout]
    (r'conv_dw/kernel$', (None, None, None, None)),               # [7, 7, 1, C]
    (r'^stem_conv/kernel$', (None, None, None, None)),            # [4, 4, 3, C0]
)


def validate(config, field: str = 'model.image'):
  """config.<field> of a ConvNeXt (see basic.models): a named timm size or explicit depths /
  dims / norm_eps."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top  (config_lib reads models)
  cfg = config_lib.get_field(config, field)
  variant = config_lib.check_str(config, f'{field}.variant')
  if variant:
    config_lib.check_choice(config, f'{field}.variant', tuple(VARIANTS))
    config_lib.check_sizes_unset(config, field, variant, _SIZES)
  else:
    n = len(config_lib.get_field(config, f'{field}.depths'))
    if not n or len(cfg.dims) != n:
      config_lib.fail(f'{field}.dims', cfg.dims,
                      f'must have one entry per stage, as {field}.depths ({n}).')
    for key in ('depths', 'dims'):
      if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cfg[key]):
        config_lib.fail(f'{field}.{key}', cfg[key], 'entries must be integers >= 1.')
    config_lib.check_positive(config, f'{field}.norm_eps')
  spec = variant_spec(variant, **{k: cfg[k] for k in _SIZES})
  for key in ('patch_size', 'kernel_size', 'mlp_ratio'):
    config_lib.check_int(config, f'{field}.{key}', 1)
  reduction = cfg.patch_size * 2 ** (len(spec['depths']) - 1)
  image_size = config.data.image_size
  if image_size % reduction:
    config_lib.fail('data.image_size', image_size,
                    f'must be a multiple of {reduction} (the ConvNeXt stem and downsampling '
                    'stages).')
  config_lib.check_positive(config, f'{field}.layer_scale_init')
  transformer.check_rate(config, f'{field}.drop_path')
  config_lib.check_choice(config, f'{field}.remat', tuple(transformer.REMAT_POLICIES))
  config_lib.check_bool(config, f'{field}.scan_layers')
