"""Pre-norm Transformer encoder shared by the image (ViT) and text towers.

Shapes: B batch, T tokens, D width. Every block is optionally rematerialised with a
`jax.checkpoint` policy chosen by name in the config (`remat`), see `REMAT_POLICIES`.

Options whose defaults keep the original numerics (and every existing config unchanged):
`activation` of the MLP (`ACTIVATIONS`; default 'gelu_tanh', the tanh approximation, which is
what `flax.linen.gelu` computes by default) and the LayerNorm `norm_eps` (default 1e-6, flax's).
OpenCLIP's non-OpenAI text towers use 'gelu' (exact, erf) and eps 1e-5 (torch's default).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def maybe_remat(block_cls, policy_name: str, static_argnums=(3,)):
  """Returns `block_cls` wrapped in `nn.remat` with the named policy ('none' = unwrapped).

  `static_argnums`: the positions of Python-bool call arguments (`deterministic`), which must
  stay static for the remat trace. nn.remat counts `self` as argument 0, so in
  EncoderBlock.__call__(self, x, mask, deterministic) it is 3 (the default); a block called as
  `block(x, deterministic)` passes (2,).
  """
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {policy_name!r}; one of {sorted(REMAT_POLICIES)}.')
  if policy_name == 'none':
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy_name],
                  static_argnums=tuple(static_argnums))


def activation_fn(name: str):
  """`ACTIVATIONS[name]`, or a ValueError naming the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> activation -> Dropout -> Dense(D). [B, T, D] -> [B, T, D]."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION

  @nn.compact
  def __call__(self, x, deterministic: bool):
    width = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init,
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = activation_fn(self.activation)(x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    return nn.Dense(width, dtype=self.dtype, kernel_init=init,
                    bias_init=nn.initializers.normal(stddev=1e-6))(x)


class EncoderBlock(nn.Module):
  """x + Attn(LN(x)); x + Mlp(LN(x)). [B, T, D] -> [B, T, D].

  `mask` is a boolean attention mask broadcastable to [B, heads, T, T] (True = attend), or None.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION
  norm_eps: float = DEFAULT_NORM_EPS

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_attn')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='attn',
    )(y, y, mask=mask, deterministic=True)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_mlp')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name='mlp')(
        y, deterministic)
    return x + nn.Dropout(self.dropout)(y, deterministic)


class Encoder(nn.Module):
  """`depth` EncoderBlocks followed by a final LayerNorm. [B, T, D] -> [B, T, D]."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  activation: str = DEFAULT_ACTIVATION
  norm_eps: float = DEFAULT_NORM_EPS

  @nn.compact
  def __call__(self, x, mask: Optional[jnp.ndarray] = None, *, train: bool = False):
    block = maybe_remat(EncoderBlock, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.activation,
                self.norm_eps, name=f'block{i:02d}')(x, mask, not train)
    return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_final')(x)
