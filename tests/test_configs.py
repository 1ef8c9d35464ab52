"""The paper configs: sizes against the papers, runlocal twins, sharding-rule coverage."""
import importlib

import jax
import numpy as np
import pytest

from basic import config_lib
from basic import sharding
from basic import train
from basic.models import build as build_model

PAPER_CONFIGS = ('basic_s', 'basic_m', 'basic_l', 'vit_b16', 'vit_l14')


def _config(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def _abstract_params(config, batch_size=1):
  """Parameter shapes of the config's DualEncoder, without allocating them."""
  batch = train.init_batch(config, batch_size)
  model = build_model(config)
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), b['image'], b['text']),
                        batch)['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _coatnet_classifier(width, classes=1000):
  """What the published CoAtNet sizes include beyond the tower (tests/test_coatnet.py)."""
  return width * width + width + width * classes + classes


# Published totals. CLIP: ViT-B/16 149.6M and ViT-L/14 427.6M (the released models). BASIC-L:
# CoAtNet-7 (2.44B, CoAtNet paper) + a 670M text tower, the "3B weights" of the BASIC abstract
# (the 670M is this repo's reading of BASIC's model-size table, not checked against the paper
# text: configs/basic_l.py). BASIC-S/M/L image towers against the CoAtNet paper's CoAtNet-0/3/7
# (25M / 168M / 2.44B, less the classifier the paper counts in them).
@pytest.mark.parametrize('name,part,published', [
    ('vit_b16', None, 149.6e6),
    ('vit_l14', None, 427.6e6),
    ('basic_l', None, 2.44e9 + 670e6),
    ('basic_l', 'text', 670e6),
    ('basic_s', 'image', 25e6 - _coatnet_classifier(768)),
    ('basic_m', 'image', 168e6 - _coatnet_classifier(1536)),
    ('basic_l', 'image', 2.44e9 - _coatnet_classifier(3072)),
])
def test_param_counts_match_published(name, part, published):
  params = _abstract_params(_config(name))
  count = _count(params if part is None else params[part])
  assert abs(count / published - 1) <= 0.02, (name, part, count)


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_full_configs_validate_for_their_tfrecord_data(name):
  config = _config(name)
  assert config.data.source == 'tfrecord'   # The pattern is the user's (config.data.*).
  config_lib.validate(config, num_data_devices=128)


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_runlocal_configs_validate_and_build(name):
  config = config_lib.validate(_config(name, 'runlocal=True'))
  assert config.data.source == 'synthetic' and config.data.image_size == 32
  assert config.batch_size == 64 and config.batch_size // config.microbatch_size == 2
  model = build_model(config)
  batch = train.init_batch(config, 2)
  params = _abstract_params(config, 2)   # Traced, not compiled: training it is test_train's job.
  image_emb, text_emb = jax.eval_shape(
      lambda p, b: model.apply({'params': p}, b['image'], b['text'], train=True,
                               rngs={'dropout': jax.random.key(0)}), params, batch)
  assert image_emb.shape == text_emb.shape == (2, config.model.embed_dim)
  assert _count(params) < 2e6


def test_parse_arg():
  from configs import common  # pylint: disable=import-outside-toplevel
  assert common.parse_arg('runlocal=True', runlocal=False).runlocal is True
  assert common.parse_arg('runlocal', runlocal=False).runlocal is True
  assert common.parse_arg(None, runlocal=False).runlocal is False
  with pytest.raises(ValueError, match='Unknown config argument'):
    common.parse_arg('bogus=1', runlocal=False)


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_sharding_rules_cover_every_large_parameter(name):
  """No parameter of >= 2^16 elements is silently replicated, and every spec fits its mesh."""
  config = _config(name)
  params = _abstract_params(config)
  rules = config.sharding.rules
  assert sharding.unmatched_params(params, rules, 2**16) == []
  model_size = 4 if config.mesh.model == -1 else config.mesh.model
  mesh = jax.sharding.AbstractMesh((128, model_size), ('data', 'model'))
  specs = sharding.param_partition_specs(params, rules, mesh, fsdp=config.sharding.fsdp,
                                         fsdp_min_size=config.sharding.fsdp_min_size)
  assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
                            ) == jax.tree.structure(params)
