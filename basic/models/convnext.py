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


def variant_spec(cfg):
  """`config.model.image` -> dict(depths, dims, norm_eps).

  `cfg.variant` names a row of VARIANTS; `variant=''` reads the explicit fields `depths`, `dims`
  and `norm_eps` from `cfg` instead (for small test models).
  """
  variant = cfg.get('variant', '')
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f'config.model.image.variant={variant!r}: one of {sorted(VARIANTS)} '
                       'or "" (explicit depths, dims, norm_eps).')
    depths, dims, norm_eps = VARIANTS[variant]
  else:
    depths, dims, norm_eps = tuple(cfg.depths), tuple(cfg.dims), cfg.norm_eps
  return dict(depths=tuple(depths), dims=tuple(dims), norm_eps=norm_eps)


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
  depths: Sequence[int]
  dims: Sequence[int]
  norm_eps: float = 1e-6
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
    if len(self.depths) != len(self.dims):
      raise ValueError(f'ConvNeXt: depths {self.depths} and dims {self.dims} must have equal '
                       'lengths.')
    init = nn.initializers.truncated_normal(0.02)
    p = self.patch_size
    x = nn.Conv(self.dims[0], (p, p), strides=(p, p), padding='VALID', kernel_init=init,
                dtype=self.dtype, name='stem_conv')(images)
    x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='stem_norm')(x)
    block_cls = transformer.maybe_remat(ConvNeXtBlock, self.remat, static_argnums=(2,))
    scanned_cls = transformer.maybe_remat(ConvNeXtBlock, self.remat, static_argnums=(2,),
                                          prevent_cse=False)
    rates = drop_path_rates(self.drop_path, self.depths)
    rng = self.make_rng('dropout') if train and self.drop_path > 0 else None
    index = 0
    for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if s > 0:
        x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                         name=f'stage{s}_downsample_norm')(x)
        x = nn.Conv(dim, (2, 2), strides=(2, 2), padding='VALID', kernel_init=init,
                    dtype=self.dtype, name=f'stage{s}_downsample_conv')(x)
      prefix = f'stage{s}_block'
      unscanned = min(depth, 1) if self.scan_layers else depth
      for i in range(unscanned):
        x = block_cls(self.kernel_size, self.mlp_ratio, self.layer_scale_init, self.norm_eps,
                      rates[index], self.dtype, name=scan_lib.block_name(prefix, i))(
                          x, not train, scan_lib.layer_rng(rng, index))
        index += 1
      if depth > unscanned:
        n = depth - unscanned
        stage_rates = (None if self.drop_path == 0 else
                       jnp.asarray(rates[index:index + n], jnp.float32))
        block = scanned_cls(self.kernel_size, self.mlp_ratio, self.layer_scale_init,
                            self.norm_eps, 0.0, self.dtype, name=scan_lib.scan_name(prefix))
        x = scan_lib.scan_blocks(block, x, (scan_lib.layer_rngs(rng, index, n), stage_rates), n,
                                 lambda mdl, y, xs: mdl(y, not train, *xs))
        index += n
    x = x.mean(axis=(1, 2))
    return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='head_norm')(x)
