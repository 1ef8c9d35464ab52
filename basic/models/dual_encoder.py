"""DualEncoder: image tower + text tower + linear projections + learnable temperature.

encode_image: uint8 or float images [B, H, W, 3] -> L2-normalised embeddings [B, embed_dim].
encode_text: int32 token ids [B, L] -> L2-normalised embeddings [B, embed_dim].
The temperature is stored as its log (`log_temperature`), initialised at
`config.model.temperature_init` and clipped below at `config.model.temperature_min`, as CLIP
clips its logit scale at 100. With `config.loss == 'sigmoid'` the model also holds SigLIP's
learnable logit `bias` (initialised at `config.model.bias_init`).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from basic.models import coatnet
from basic.models import convnext
from basic.models import text as text_lib
from basic.models import transformer
from basic.models import vit

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _scan_layers(cfg, tower: str) -> bool:
  """`config.model.<tower>.scan_layers` (absent = False), checked to be a bool."""
  value = cfg.get('scan_layers', False)
  if not isinstance(value, bool):
    raise ValueError(f'config.model.{tower}.scan_layers={value!r}: must be True or False.')
  return value


IMAGE_TOWERS = ('vit', 'coatnet', 'convnext')
TEXT_TOWERS = ('transformer',)


def _image_tower(cfg, dtype):
  if cfg.name == 'vit':
    mask = cfg.get('mask', None)   # CLIPA token reduction (training only); absent = off.
    return vit.ViT(patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
                   num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, pool=cfg.pool,
                   posemb=cfg.get('posemb', 'learn'), dropout=cfg.dropout, remat=cfg.remat,
                   mask=mask.kind if mask else 'none', mask_ratio=mask.ratio if mask else 0.0,
                   mask_cell=mask.cell if mask else 2, dtype=dtype,
                   activation=cfg.get('activation', transformer.DEFAULT_ACTIVATION),
                   norm_eps=cfg.get('norm_eps', transformer.DEFAULT_NORM_EPS),
                   ln_pre=cfg.get('ln_pre', False), patch_bias=cfg.get('patch_bias', True),
                   scan_layers=_scan_layers(cfg, 'image'), name='image')
  if cfg.name == 'coatnet':
    return coatnet.CoAtNet(**coatnet.variant_spec(cfg), drop_path=cfg.get('drop_path', 0.0),
                           remat=cfg.get('remat', 'none'), dtype=dtype,
                           scan_layers=_scan_layers(cfg, 'image'), name='image')
  if cfg.name == 'convnext':
    return convnext.ConvNeXt(**convnext.variant_spec(cfg), drop_path=cfg.get('drop_path', 0.0),
                             remat=cfg.get('remat', 'none'), dtype=dtype,
                             scan_layers=_scan_layers(cfg, 'image'), name='image')
  raise ValueError(f'Unknown config.model.image.name {cfg.name!r}.')


def _text_tower(cfg, dtype):
  if cfg.name == 'transformer':
    return text_lib.TextTransformer(
        vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim, causal=cfg.causal, mask_padding=cfg.get('mask_padding', True),
        pool=cfg.pool, dropout=cfg.dropout,
        remat=cfg.remat, dtype=dtype,
        activation=cfg.get('activation', transformer.DEFAULT_ACTIVATION),
        norm_eps=cfg.get('norm_eps', transformer.DEFAULT_NORM_EPS),
        scan_layers=_scan_layers(cfg, 'text'), name='text')
  raise ValueError(f'Unknown config.model.text.name {cfg.name!r}.')


def l2_normalize(x, eps=1e-6):
  """x / max(||x||, eps) in float32 (eps only guards a zero vector; torch's F.normalize uses
  1e-12, the same for any embedding of norm > 1e-6)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DualEncoder(nn.Module):
  """The contrastive model of a config: `DualEncoder(config)` (the full experiment config).

  Reads `config.model` (towers, embed_dim, temperature) and `config.data.mean/std` (image
  normalisation applied to uint8 inputs on device).
  """
  config: ml_collections.ConfigDict

  def setup(self):
    m = self.config.model
    dtype = DTYPES[m.dtype]
    self.image = _image_tower(m.image, dtype)
    self.text = _text_tower(m.text, dtype)
    self.image_proj = nn.Dense(m.embed_dim, use_bias=False, name='image_proj')
    self.text_proj = nn.Dense(m.embed_dim, use_bias=False, name='text_proj')
    self.log_temperature = self.param(
        'log_temperature', nn.initializers.constant(np.log(m.temperature_init)), (),
        jnp.float32)
    if self.config.loss == 'sigmoid':  # SigLIP's learnable logit bias.
      self.bias = self.param('bias', nn.initializers.constant(m.bias_init), (), jnp.float32)

  def encode_image(self, images, *, train: bool = False):
    """[B, H, W, 3] uint8 (or float already normalised) -> [B, embed_dim] unit vectors."""
    if images.dtype == jnp.uint8:
      mean = jnp.asarray(self.config.data.mean, jnp.float32)
      std = jnp.asarray(self.config.data.std, jnp.float32)
      images = (images.astype(jnp.float32) / 255. - mean) / std
    return l2_normalize(self.image_proj(self.image(images, train=train)))

  def encode_text(self, tokens, *, train: bool = False):
    """[B, L] int32 -> [B, embed_dim] unit vectors."""
    return l2_normalize(self.text_proj(self.text(tokens, train=train)))

  def temperature(self):
    """Scalar temperature, clipped at config.model.temperature_min."""
    return temperature_from_params({'log_temperature': self.log_temperature}, self.config)

  def __call__(self, images, tokens, *, train: bool = False):
    """-> (image_emb [B, d], text_emb [B, d])."""
    return self.encode_image(images, train=train), self.encode_text(tokens, train=train)


def temperature_from_params(params, config):
  """The clipped temperature from a params dict holding `log_temperature`."""
  lo = np.log(config.model.temperature_min)
  return jnp.exp(jnp.maximum(params['log_temperature'], lo))
