"""DualEncoder: image tower + text tower + linear projections + learnable temperature.

encode_image: uint8 or float images [B, H, W, 3] -> L2-normalised embeddings [B, embed_dim].
encode_text: int32 token ids [B, L] -> L2-normalised embeddings [B, embed_dim].

`DualEncoder(config.model, mean=..., std=..., extra_params=...)` builds the towers named by
`config.model.image.name` and `config.model.text.name` (the registries of basic.models), each from
its config passed straight through: `Model(**cfg less name, dtype=DTYPES[config.model.dtype])`.
`build(config)` is the DualEncoder of a whole experiment config: the data's normalisation of
uint8 images (`config.data.mean/std`) and the scalar parameters the loss owns
(`basic.losses.extra_params`, from the entry of `config.loss`).

The temperature is stored as its log (`log_temperature`), initialised at
`config.model.temperature_init` and clipped below at `config.model.temperature_min`, as CLIP
clips its logit scale at 100. `extra_params` ((name, init value), ...) adds scalar float32
parameters a loss owns at the top level, e.g. SigLIP's learnable logit bias ('bias',
config.model.bias_init).
"""
import dataclasses
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from basic import losses
from basic.models import IMAGE_TOWERS
from basic.models import TEXT_TOWERS

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Fields of a tower Model that are not config keys: flax's own, and `dtype` (config.model.dtype).
_NOT_CONFIG = ('parent', 'name', 'dtype')
# The projections, [tower width, embed_dim]: rows over 'model' (the towers' outputs are whole).
PROJECTION_RULES = ((r'^(image|text)_proj/kernel$', ('model', None)),)


def tower_fields(model_cls) -> dict:
  """{config key: default} of a tower Model (dataclasses.MISSING for a required field)."""
  out = {}
  for field in dataclasses.fields(model_cls):
    if field.name in _NOT_CONFIG or not field.init:
      continue
    if field.default is not dataclasses.MISSING:
      out[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[field.name] = field.default_factory()
    else:
      out[field.name] = dataclasses.MISSING
  return out


def _frozen(value):
  """A config value as a hashable module field: mappings -> FrozenDict, lists -> tuples."""
  if isinstance(value, (ml_collections.ConfigDict, dict, flax.core.FrozenDict)):
    return flax.core.FrozenDict({k: _frozen(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def tower(registry, cfg, dtype, name: str) -> nn.Module:
  """The Model of the tower `cfg.name` (a `registry` entry) with `cfg` passed through."""
  entry = registry.get(cfg.name)
  kwargs = {k: _frozen(v) for k, v in cfg.items() if k != 'name'}
  return entry.Model(**kwargs, dtype=dtype, name=name)


def _under(tower_name: str, pattern: str) -> str:
  """A tower's rule (re.search'ed on paths inside the tower) as the same rule on DualEncoder
  paths ('image/...')."""
  if pattern.startswith('^'):
    return f'^{tower_name}/{pattern[1:]}'
  return f'^{tower_name}/.*?(?:{pattern})'


def sharding_rules(model_config) -> tuple:
  """config.sharding.rules for `config.model`: the towers' SHARDING_RULES (under 'image/' and
  'text/') and the projections'. Megatron-style tensor parallelism over 'model'."""
  rules = []
  for tower_name, registry in (('image', IMAGE_TOWERS), ('text', TEXT_TOWERS)):
    for pattern, spec in registry.get(model_config[tower_name].name).SHARDING_RULES:
      rules.append((_under(tower_name, pattern), tuple(spec)))
  return tuple(rules) + PROJECTION_RULES


def l2_normalize(x, eps=1e-6):
  """x / max(||x||, eps) in float32 (eps only guards a zero vector; torch's F.normalize uses
  1e-12, the same for any embedding of norm > 1e-6)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DualEncoder(nn.Module):
  """The contrastive model of `config.model` (see the module docstring; `build(config)`).

  Fields: config = config.model; mean, std: per-channel normalisation of uint8 images on device,
  (x / 255 - mean) / std; extra_params: ((name, init value), ...) scalar parameters of the loss.
  """
  config: ml_collections.ConfigDict
  mean: Sequence[float]
  std: Sequence[float]
  extra_params: Sequence[tuple[str, float]] = ()

  def setup(self):
    m = self.config
    dtype = DTYPES[m.dtype]
    self.image = tower(IMAGE_TOWERS, m.image, dtype, 'image')
    self.text = tower(TEXT_TOWERS, m.text, dtype, 'text')
    self.image_proj = nn.Dense(m.embed_dim, use_bias=False, name='image_proj')
    self.text_proj = nn.Dense(m.embed_dim, use_bias=False, name='text_proj')
    self.log_temperature = self.param(
        'log_temperature', nn.initializers.constant(np.log(m.temperature_init)), (),
        jnp.float32)
    for name, init in self.extra_params:
      self.param(name, nn.initializers.constant(init), (), jnp.float32)

  def encode_image(self, images, *, train: bool = False):
    """[B, H, W, 3] uint8 (or float already normalised) -> [B, embed_dim] unit vectors."""
    if images.dtype == jnp.uint8:
      mean = jnp.asarray(self.mean, jnp.float32)
      std = jnp.asarray(self.std, jnp.float32)
      images = (images.astype(jnp.float32) / 255. - mean) / std
    return l2_normalize(self.image_proj(self.image(images, train=train)))

  def encode_text(self, tokens, *, train: bool = False):
    """[B, L] int32 -> [B, embed_dim] unit vectors."""
    return l2_normalize(self.text_proj(self.text(tokens, train=train)))

  def __call__(self, images, tokens, *, train: bool = False):
    """-> (image_emb [B, d], text_emb [B, d])."""
    return self.encode_image(images, train=train), self.encode_text(tokens, train=train)


def build(config: Any) -> DualEncoder:
  """The DualEncoder of an experiment config (its model, data normalisation and loss)."""
  return DualEncoder(config.model, mean=tuple(config.data.mean), std=tuple(config.data.std),
                     extra_params=losses.extra_params(config))


def temperature_from_params(params, config):
  """The clipped temperature from a params dict holding `log_temperature`."""
  lo = np.log(config.model.temperature_min)
  return jnp.exp(jnp.maximum(params['log_temperature'], lo))
