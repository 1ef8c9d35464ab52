"""Extending basic: a loss, a data source and an evaluator, each one file registered by one line,
train a few steps of the tiny config and evaluate (basic.losses, basic.data, basic.evaluate).

The toy extensions live in tests/toy_loss.py, toy_source.py and toy_evaluator.py; each is
registered by its module path (imported when first used) as user code would register its own.
"""
import os

import ml_collections
import numpy as np
import pytest

import basic.data
from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import evaluate
from basic import losses
from basic import metric_writers
from basic import train
from basic.evaluate import tasks
import config_helpers


@pytest.fixture
def registered():
  """The three toy extensions, one registry line each (removed again after the test)."""
  losses.LOSSES.register('toy_hinge', 'toy_loss')
  basic.data.SOURCES.register('toy_colours', 'toy_source')
  evaluate.EVALUATORS.register('toy_alignment', 'toy_evaluator')
  yield
  losses.LOSSES.unregister('toy_hinge')
  basic.data.SOURCES.unregister('toy_colours')
  evaluate.EVALUATORS.unregister('toy_alignment')


def _config():
  config = config_helpers.tiny_config({
      'batch_size': 16, 'microbatch_size': 16, 'total_steps': 3, 'log_every_steps': 1,
      'eval_every_steps': 3, 'checkpoint_every_steps': 3, 'eval.zeroshot': False,
      'tokenizer.train_sentences': 200, 'model.embed_dim': 16,
      'loss': 'toy_hinge', 'data.source': 'toy_colours'})
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 16, 1, 2, 32
  config.model.toy_margin_init = 0.2                 # The toy loss's field (its `parameters`).
  config.data.toy_colours = ml_collections.ConfigDict({'num_colours': 4})   # The source's.
  config.eval.tasks.toy = tasks.task('toy_alignment', num_examples=8)
  return config


def test_toy_loss_source_and_evaluator_train_and_evaluate(registered, tmp_path):
  del registered
  config = _config()
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert set(results) == {'toy/alignment', 'toy/top1'}
  assert -1 <= results['toy/alignment'] <= 1 and 0 <= results['toy/top1'] <= 1
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  steps = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  assert all(np.isfinite(r['train/loss']) and r['train/loss'] > 0 for r in steps)
  assert [r['step'] for r in rows if 'toy/top1' in r] == [3]
  # The loss's own parameter is the model's, trained with it.
  params = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       read_only=True).restore_params(3)
  assert 'margin' in params and 'bias' not in params
  assert float(params['margin']) != pytest.approx(0.2, abs=1e-7)


@pytest.mark.parametrize('field, value, message', [
    ('model.toy_margin_init', -1.0, 'config.model.toy_margin_init=-1.0'),
    ('data.toy_colours.num_colours', 99, 'config.data.toy_colours.num_colours=99'),
    ('eval.tasks.toy.num_examples', 0, 'config.eval.tasks.toy.num_examples=0'),
    ('eval.tasks.toy.kind', 'toy_nope', "config.eval.tasks.toy.kind='toy_nope': must be one of"),
    ('loss', 'toy_nope', "config.loss='toy_nope': unknown loss"),
    ('data.source', 'toy_nope', "config.data.source='toy_nope': unknown data source"),
])
def test_extension_fields_are_validated(registered, field, value, message):
  del registered
  config = _config()
  config_lib.validate(config)
  node = config
  *parents, leaf = field.split('.')
  for name in parents:
    node = node[name]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.')):
    config_lib.validate(config)
