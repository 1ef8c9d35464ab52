"""Transformer text tower. [B, L] int32 token ids (0 = padding) -> [B, width] pooled features."""
import flax.linen as nn
import jax.numpy as jnp

from basic import sharding
from basic.models import transformer

PAD_ID = 0


class TextTransformer(nn.Module):
  """Token + learned position embeddings, a pre-norm Transformer, then pooling.

  causal: each token attends to itself and earlier tokens only (CLIP); else bidirectional.
  mask_padding: padding tokens (id 0) are never attended to (default). OpenAI's CLIP BPE gives id
  0 to '!', so CLIP models set it False and attend to every token as CLIP does (with causal
  attention and 'argmax' pooling, the padding after EOT never reaches the pooled EOT token).
  Pooling ('mean', 'eos') counts id 0 as padding either way.
  pool: 'mean' over non-padding tokens, 'eos' = the last non-padding token (CLIP's EOT pooling
  when the tokenizer appends EOS), 'first' = token 0, 'argmax' = the token with the highest id
  (OpenAI CLIP / OpenCLIP: `text.argmax(dim=-1)`, which is the EOT token because CLIP's BPE gives
  EOT the largest id, 49407). activation / norm_eps: see `basic.models.transformer` (defaults
  keep the original numerics).
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  mask_padding: bool = True
  pool: str = 'mean'
  dropout: float = 0.0
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  activation: str = transformer.DEFAULT_ACTIVATION
  norm_eps: float = transformer.DEFAULT_NORM_EPS
  scan_layers: bool = False  # One nn.scan over the Transformer blocks (basic.models.scan).

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    _, length = tokens.shape
    valid = tokens != PAD_ID                                               # [B, L]
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=self.dtype, name='token_embedding')(tokens)
    x = sharding.constrain_batch(x)     # Not the (FSDP-sharded) table's layout; see there.
    pos = self.param('pos_embedding', nn.initializers.normal(0.01),
                     (1, length, self.width), jnp.float32)
    x = x + pos.astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, not train)
    attend = valid if self.mask_padding else jnp.ones_like(valid)
    mask = nn.make_attention_mask(attend, attend)                          # [B, 1, L, L]
    if self.causal:
      mask = nn.combine_masks(mask, nn.make_causal_mask(tokens))
    # A row with no valid key (an all-padding caption) attends to itself to stay finite.
    mask = jnp.logical_or(mask, jnp.eye(length, dtype=bool)[None, None])
    x = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout,
                            self.remat, self.dtype, self.activation, self.norm_eps,
                            scan_layers=self.scan_layers, name='encoder')(x, mask, train=train)
    if self.pool == 'mean':
      w = valid.astype(x.dtype)[..., None]
      return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)
    if self.pool == 'eos':
      last = jnp.maximum(valid.sum(axis=1) - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if self.pool == 'first':
      return x[:, 0]
    if self.pool == 'argmax':
      eot = jnp.argmax(tokens, axis=1)                                      # [B]
      return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    raise ValueError(f'Unknown text pool {self.pool!r}.')


Model = TextTransformer

# Rules on paths inside the tower (basic.models): the Encoder's, plus the vocabulary split over
# 'model' and the position embedding's width.
SHARDING_RULES = transformer.SHARDING_RULES + (
    (r'^token_embedding/embedding$', ('model', None)),     # [vocab, D]
    (r'^pos_embedding$', (None, None, 'model')),           # [1, L, D]
)
POOLS = ('mean', 'eos', 'first', 'argmax')
MIN_VOCAB = 8   # The tokenizers' special ids fit.


def validate(config, field: str = 'model.text'):
  """config.<field> of a TextTransformer (see basic.models)."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top  (config_lib reads models)
  config_lib.check_int(config, f'{field}.vocab_size', MIN_VOCAB)
  transformer.validate_encoder(config, field, POOLS)
  config_lib.check_bool(config, f'{field}.causal')
  config_lib.check_bool(config, f'{field}.mask_padding')
