"""Extending basic with a tower: tests/toy_tower.py, one file registered by one line, trains a
few steps of the tiny config as its image tower and evaluates (basic.models)."""
import os

import numpy as np
import pytest

from basic import config_defaults
from basic import config_lib
from basic import metric_writers
from basic import models
from basic import train
import config_helpers


@pytest.fixture
def registered():
  models.IMAGE_TOWERS.register('toy_patches', 'toy_tower')   # The one line.
  yield
  models.IMAGE_TOWERS.unregister('toy_patches')


def _config():
  config = config_helpers.tiny_config({
      'batch_size': 16, 'microbatch_size': 16, 'total_steps': 3, 'log_every_steps': 1,
      'eval_every_steps': 3, 'checkpoint_every_steps': 3, 'tokenizer.train_sentences': 200,
      'model.embed_dim': 16, 'model.text.width': 16, 'model.text.depth': 1,
      'model.text.num_heads': 2, 'model.text.mlp_dim': 32})
  config.model.image = config_defaults.tower('toy_patches', width=24)
  config.sharding.rules = models.sharding_rules(config.model)
  return config


def test_toy_tower_trains_and_evaluates(registered, tmp_path):
  del registered
  config = _config()
  assert config.model.image.to_dict() == {'name': 'toy_patches', 'width': 24, 'patch_size': 4}
  assert config.sharding.rules[0] == ('^image/out/kernel$', (None, 'model'))
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert 0 <= results['zeroshot/top1'] <= 1
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize('field, value, message', [
    ('patch_size', 5, 'config.model.image.patch_size=5: must divide'),
    ('width', 0, 'config.model.image.width=0'),
    ('depth', 2, "config.model.image.depth=2: not a field of the 'toy_patches' image tower"),
])
def test_toy_tower_fields_are_validated(registered, field, value, message):
  del registered
  config = _config()
  config_lib.validate(config)
  config.model.image[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.')):
    config_lib.validate(config)
