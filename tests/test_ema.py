"""config.ema_decay: the EMA of the parameters in the train state (basic.train.EmaTrainState)."""
import os
import tempfile

import jax
import numpy as np
import pytest

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import inference
from basic import metric_writers
from basic import models
from basic import optim
from basic import sharding
from basic import tokenizer as tokenizer_lib
from basic import train
from basic.evaluate import run as evaluate_run
import config_helpers

SMALL = {
    'batch_size': 16, 'microbatch_size': 16, 'total_steps': 6, 'log_every_steps': 3,
    'eval_every_steps': 6, 'checkpoint_every_steps': 3, 'data.synthetic.eval_per_class': 2,
    'tokenizer.train_sentences': 2000, 'optimizer.warmup_steps': 0,
    'optimizer.learning_rate': 1e-2, 'ema_decay': 0.7,
}
_TOKENIZER = {}


def _config(**overrides):
  config = config_helpers.tiny_config({**SMALL, **overrides})
  if 'path' not in _TOKENIZER:   # One SentencePiece model for every run of this module.
    _TOKENIZER['path'] = tokenizer_lib.ensure_tokenizer(config, tempfile.mkdtemp())
  config.tokenizer.model_path = _TOKENIZER['path']
  return config


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def test_ema_after_k_steps_is_the_formula_over_the_parameter_sequence():
  """ema_k = d ema_{k-1} + (1 - d) params_k from ema_0 = params_0, per leaf, at 1e-6; the
  skipped non-finite update 2 (on_nonfinite='skip') leaves it unchanged."""
  d = 0.7
  config = _config(debug_nan_at_step=2, on_nonfinite='skip')
  model, tx, schedule, state, _ = train.init_training(config)
  assert isinstance(state, train.EmaTrainState)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  sequence = [_leaves(state.params)]
  ema = _leaves(state.ema)
  for k in range(3):
    state, metrics = step(state, train.random_batch(config, 16, seed=k), jax.random.key(0))
    sequence.append(_leaves(state.params))
    assert int(metrics['train/nonfinite']) == (k == 1)
    if k != 1:
      ema = [d * e + (1 - d) * p for e, p in zip(ema, sequence[-1])]
  assert int(state.step) == 3
  assert np.array_equal(_leaves(state.params)[0], sequence[-1][0])
  got = _leaves(state.ema)
  for g, want in zip(got, ema):
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
  # Not vacuous: the EMA is neither the initial nor the current parameters.
  flat = lambda leaves: np.concatenate([x.ravel() for x in leaves])
  got, first, last = flat(got), flat(sequence[0]), flat(sequence[-1])
  assert np.linalg.norm(got - last) > 1e-3 * np.linalg.norm(last)
  assert np.linalg.norm(got - first) > 1e-3 * np.linalg.norm(first)
  assert all(np.array_equal(a, b) for a, b in zip(sequence[1], sequence[2]))   # Skipped.


def test_ema_is_sharded_like_the_parameters():
  config = _config(**{'sharding.fsdp': True, 'sharding.fsdp_min_size': 1024})
  model = models.build(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = train.abstract_train_state(config, model, tx, mesh)
  specs = lambda tree: [s.spec for s in jax.tree.leaves(tree)]
  assert jax.tree.structure(abstract.ema) == jax.tree.structure(abstract.params)
  assert specs(shardings.ema) == specs(shardings.params)
  assert any(s != jax.sharding.PartitionSpec() for s in specs(shardings.params))   # FSDP


def test_ema_off_keeps_the_plain_state_and_bad_values_name_the_field():
  config = _config(ema_decay=0.0)
  model = models.build(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract = jax.eval_shape(train.make_init_fn(config, model, tx))
  assert type(abstract) is train.TrainState and not hasattr(abstract, 'ema')
  assert len(jax.tree.leaves(abstract)) == 1 + len(jax.tree.leaves(abstract.params)) + len(
      jax.tree.leaves(abstract.opt_state))
  for bad in (1.0, -0.1, True):
    with pytest.raises(config_lib.ConfigError, match=r'config\.ema_decay='):
      config_lib.validate(config_helpers.tiny_config({'ema_decay': bad}, type_safe=False))
  assert config_lib.resume_rule('ema_decay') == config_lib.FIXED


def _ema_of(workdir, step):
  with checkpoint_lib.open_step(workdir, step) as (ckpt, step):
    return ckpt.restore(None, step)['ema']


def test_training_logs_ema_metrics_resume_continues_it_and_inference_loads_it(tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  results = train.train_and_evaluate(_config(), straight)
  assert 0 <= results['zeroshot_ema/top1'] <= results['zeroshot_ema/top5'] <= 1
  rows = metric_writers.read_jsonl(os.path.join(straight, 'metrics.jsonl'))
  row = [r for r in rows if 'zeroshot_ema/top1' in r]
  assert [r['step'] for r in row] == [6] and 'zeroshot/top1' in row[0]
  assert row[0]['zeroshot_ema/top1'] == results['zeroshot_ema/top1']

  # Interrupted after the checkpoint of step 3 (a crash at step 5), rerun: the same EMA.
  with pytest.raises(RuntimeError, match='injected failure'):
    train.train_and_evaluate(_config(debug_raise_at_step=5), resumed)
  assert checkpoint_lib.Checkpointer(os.path.join(resumed, 'checkpoints'),
                                     read_only=True).all_steps() == [3]
  train.train_and_evaluate(_config(), resumed)
  for a, b in zip(_leaves(_ema_of(straight, 6)), _leaves(_ema_of(resumed, 6))):
    np.testing.assert_allclose(b, a, rtol=1e-7, atol=0)

  # inference.load(use_ema=True): the checkpoint's EMA, not its parameters.
  ema, raw = inference.load(straight, use_ema=True), inference.load(straight)
  for a, b in zip(_leaves(ema.params), _leaves(_ema_of(straight, 6))):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(ema.params), _leaves(raw.params)))
  # python -m basic.evaluate --use_ema: the metrics training logged for the EMA.
  step, evaluated = evaluate_run.evaluate_checkpoint(straight, use_ema=True)
  assert step == 6 and 'zeroshot/top1' not in evaluated
  assert evaluated['zeroshot_ema/top1'] == pytest.approx(results['zeroshot_ema/top1'], abs=1e-6)
  # A checkpoint without an EMA: use_ema fails naming it; resuming it with an EMA names the field.
  plain = _config(ema_decay=0.0)
  state = train.init_training(plain)[3]
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'plain' / 'checkpoints'), async_save=False)
  with open(_TOKENIZER['path'], 'rb') as f:
    ckpt.save(0, state, plain, tokenizer_model=f.read())
  ckpt.close()
  with pytest.raises(ValueError, match=r'use_ema=True.*config\.ema_decay=0'):
    inference.load(str(tmp_path / 'plain'), use_ema=True)
  with pytest.raises(config_lib.ConfigError, match=r'config\.ema_decay: 0\.0 in the checkpoint'):
    train.train_and_evaluate(_config(), str(tmp_path / 'plain'))
