"""Pre-norm Transformer encoder shared by the image (ViT) and text towers.

Shapes: B batch, T tokens, D width. Every block is optionally rematerialised with a
`jax.checkpoint` policy chosen by name in the config (`remat`), see `REMAT_POLICIES`. With
`scan_layers` the blocks run as one `nn.scan` over stacked parameters (`basic.models.scan`:
module 'block_scan' instead of 'block00'..; the same function, compiled once).

Options whose defaults keep the original numerics (and every existing config unchanged):
`activation` of the MLP (`ACTIVATIONS`; default 'gelu_tanh', the tanh approximation, which is
what `flax.linen.gelu` computes by default) and the LayerNorm `norm_eps` (default 1e-6, flax's).
OpenCLIP's non-OpenAI text towers use 'gelu' (exact, erf) and eps 1e-5 (torch's default).
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from basic.models import scan as scan_lib

# Names accepted by `config.model.*.remat`. None: no rematerialisation (all activations kept).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}

# Names accepted by `config.model.*.activation` (MLP non-linearity).
ACTIVATIONS = {
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),    # flax's default GELU.
    'gelu': lambda x: nn.gelu(x, approximate=False),        # Exact: x * Phi(x), via erf.
    'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x),      # OpenAI CLIP's approximation.
}
DEFAULT_ACTIVATION = 'gelu_tanh'
DEFAULT_NORM_EPS = 1e-6   # flax.linen.LayerNorm's default epsilon.

# Sharding of an Encoder's blocks (rules on paths inside a tower, see basic.models): Megatron-style
# over 'model', attention heads and the MLP hidden units split, so each block needs one
# all-reduce after attention and one after the MLP.
SHARDING_RULES = (
    (r'attn/(query|key|value)/kernel$', (None, 'model', None)),   # [D, heads, D/heads]
    (r'attn/(query|key|value)/bias$', ('model', None)),           # [heads, D/heads]
    (r'attn/out/kernel$', ('model', None, None)),                 # [heads, D/heads, D]
    (r'mlp/fc1/kernel$', (None, 'model')),                        # [D, mlp_dim]
    (r'mlp/fc1/bias$', ('model',)),                               # [mlp_dim]
    (r'mlp/fc2/kernel$', ('model', None)),                        # [mlp_dim, D]
)


def check_rate(config, field: str):
  """config.<field> is a number in [0, 1) (a dropout or drop-path rate); ConfigError naming it."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top  (config_lib reads models)
  value = config_lib.get_field(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    config_lib.fail(field, value, 'must be in [0, 1).')
  return value


def validate_encoder(config, field: str, pools: Sequence[str], *, sizes: bool = True):
  """The Encoder fields of the tower config at config.<field> (ViT and text towers): with
  `sizes`, width, num_heads (dividing width), depth and mlp_dim (False: a variant's); pool (one
  of `pools`), dropout, remat, activation, norm_eps, scan_layers."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  if sizes:
    width = config_lib.check_int(config, f'{field}.width', 1)
    heads = config_lib.check_int(config, f'{field}.num_heads', 1)
    if width % heads:
      config_lib.fail(f'{field}.num_heads', heads, f'must divide {field}.width={width}.')
    config_lib.check_int(config, f'{field}.depth', 1)
    config_lib.check_int(config, f'{field}.mlp_dim', 1)
  config_lib.check_choice(config, f'{field}.pool', tuple(pools))
  config_lib.check_choice(config, f'{field}.remat', tuple(REMAT_POLICIES))
  check_rate(config, f'{field}.dropout')
  config_lib.check_choice(config, f'{field}.activation', tuple(ACTIVATIONS))
  config_lib.check_positive(config, f'{field}.norm_eps')
  config_lib.check_bool(config, f'{field}.scan_layers')


def maybe_remat(block_cls, policy_name: str, static_argnums=(3,), prevent_cse: bool = True):
  """Returns `block_cls` wrapped in `nn.remat` with the named policy ('none' = unwrapped).

  `static_argnums`: the positions of Python-bool call arguments (`deterministic`), which must
  stay static for the remat trace. nn.remat counts `self` as argument 0, so in
  EncoderBlock.__call__(self, x, mask, deterministic) it is 3 (the default); a block called as
  `block(x, deterministic)` passes (2,). `prevent_cse=False` inside `nn.scan` (the scan already
  keeps XLA from merging the recomputation with the forward pass; jax.checkpoint's advice).
  """
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {policy_name!r}; one of {sorted(REMAT_POLICIES)}.')
  if policy_name == 'none':
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy_name],
                  static_argnums=tuple(static_argnums), prevent_cse=prevent_cse)


def activation_fn(name: str):
  """`ACTIVATIONS[name]`, or a ValueError naming the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """fc1: Dense(mlp_dim) -> activation -> Dropout -> fc2: Dense(D). [B, T, D] -> [B, T, D]."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None):
    """rng: the dropout key (None: drawn from the 'dropout' stream)."""
    width = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init,
                 bias_init=nn.initializers.normal(stddev=1e-6), name='fc1')(x)
    x = activation_fn(self.activation)(x)
    x = nn.Dropout(self.dropout)(x, deterministic, rng=rng)
    return nn.Dense(width, dtype=self.dtype, kernel_init=init,
                    bias_init=nn.initializers.normal(stddev=1e-6), name='fc2')(x)


class EncoderBlock(nn.Module):
  """x + Attn(LN(x)); x + Mlp(LN(x)). [B, T, D] -> [B, T, D].

  `mask` is a boolean attention mask broadcastable to [B, heads, T, T] (True = attend), or None.
  `rng`: the block's dropout key; its three dropout layers use fold_in(rng, 0 / 1 / 2) (None:
  each draws from the 'dropout' stream by its module path).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION
  norm_eps: float = DEFAULT_NORM_EPS

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, rng=None):
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_attn')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='attn',
    )(y, y, mask=mask, deterministic=True)
    x = x + nn.Dropout(self.dropout)(y, deterministic, rng=scan_lib.fold(rng, 0))
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_mlp')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name='mlp')(
        y, deterministic, scan_lib.fold(rng, 1))
    return x + nn.Dropout(self.dropout)(y, deterministic, rng=scan_lib.fold(rng, 2))


class Encoder(nn.Module):
  """`depth` EncoderBlocks followed by a final LayerNorm. [B, T, D] -> [B, T, D].

  Blocks 'block00'.. or, with `scan_layers`, one scanned 'block_scan' (parameters stacked
  [depth, ...]); equal outputs for converted parameters (`basic.models.scan`). In training with
  dropout, block l's dropout key is fold_in(k, l), k drawn once from the 'dropout' stream.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION
  norm_eps: float = DEFAULT_NORM_EPS
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, mask: Optional[jnp.ndarray] = None, *, train: bool = False):
    rng = self.make_rng('dropout') if train and self.dropout > 0 else None
    args = (self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.activation,
            self.norm_eps)
    if self.scan_layers:
      block = maybe_remat(EncoderBlock, self.remat, prevent_cse=False)(
          *args, name=scan_lib.scan_name('block'))
      x = scan_lib.scan_blocks(
          block, x, scan_lib.layer_rngs(rng, 0, self.depth), self.depth,
          lambda mdl, y, layer_rng: mdl(y, mask, not train, layer_rng))
    else:
      block = maybe_remat(EncoderBlock, self.remat)
      for i in range(self.depth):
        x = block(*args, name=scan_lib.block_name('block', i))(
            x, mask, not train, scan_lib.layer_rng(rng, i))
    return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_final')(x)
