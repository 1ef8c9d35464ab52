"""End-to-end training on the embedded default: metrics, TensorBoard, checkpoints, resume."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import metric_writers
from basic import train
import config_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    'batch_size': 32, 'microbatch_size': 16, 'total_steps': 6, 'log_every_steps': 2,
    'eval_every_steps': 6, 'checkpoint_every_steps': 3, 'data.synthetic.eval_per_class': 4,
    'tokenizer.train_sentences': 2000,
}


def small_config(**overrides):
  return config_helpers.tiny_config({**SMALL, **overrides})


def _train_rows(workdir):
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [r for r in rows if 'train/loss' in r]


def test_short_run_writes_metrics_events_checkpoints(tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(small_config(), workdir)
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6]
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)
  zs = [r for r in rows if 'zeroshot/top1' in r]
  assert len(zs) == 1 and zs[0]['step'] == 6
  assert 0.0 <= zs[0]['zeroshot/top1'] <= zs[0]['zeroshot/top5'] <= 1.0
  assert zs[0]['zeroshot/num_classes'] == 48 and zs[0]['zeroshot/num_images'] == 40
  assert results['zeroshot/top1'] == zs[0]['zeroshot/top1']
  assert any(r.get('steps_per_sec') for r in rows)
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'spm.model'))


def test_rerun_after_finish_and_extension_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(), workdir)
  # The same command again: nothing is retrained, the final state is evaluated.
  again = train.train_and_evaluate(small_config(), workdir)
  assert [r['step'] for r in _train_rows(workdir)] == [2, 4, 6]
  assert again['zeroshot/top1'] >= 0.0
  # A longer schedule continues from step 6, not from scratch.
  train.train_and_evaluate(small_config(total_steps=8), workdir)
  assert [r['step'] for r in _train_rows(workdir)] == [2, 4, 6, 8]


def test_loss_decreases_on_fixed_batch():
  config = small_config(total_steps=100)
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-3
  model, tx, schedule, state, _ = train.init_training(config)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  rs = np.random.RandomState(0)
  batch = {'image': jnp.asarray(rs.randint(0, 256, (32, 32, 32, 3)), jnp.uint8),
           'text': jnp.asarray(rs.randint(4, 256, (32, 16)), jnp.int32)}
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['train/loss']))
  assert losses[0] > np.log(32) * 0.9           # starts near chance: log(N).
  assert losses[-1] < 0.5 * losses[0], losses


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(), workdir)       # checkpoints at 3 and 6.
  real = train.make_loss_fn
  monkeypatch.setattr(train, 'make_loss_fn',
                      lambda *args: (lambda *a: real(*args)(*a) * jnp.nan))
  with pytest.raises(train.NonFiniteLossError,
                     match=r'step 7; the last good checkpoint is step 6'):
    train.train_and_evaluate(small_config(total_steps=10), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


def _params_after(config, steps):
  """Parameters after `steps` train steps on the pipeline's first batches."""
  from basic import tokenizer as tokenizer_lib
  from basic.data import pipeline
  model, tx, schedule, state, _ = train.init_training(config)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  tokenizer = tokenizer_lib.Tokenizer.from_config(
      config.tokenizer, _shared_tokenizer(config), config.data.text_length)
  batches = pipeline.make_train_iterator(config, tokenizer)
  for _ in range(steps):
    state, _ = step(state, next(batches), jax.random.key(0))
  return state.params


def _raw_gradients(config):
  """The step's gradient-cached (loss, grads) of the pipeline's first batch at init, before
  clipping and Adam (which would hide a constant factor, e.g. on the temperature)."""
  from basic import gradcache
  from basic import tokenizer as tokenizer_lib
  from basic.data import pipeline
  model, _, _, state, _ = train.init_training(config)
  tokenizer = tokenizer_lib.Tokenizer.from_config(
      config.tokenizer, _shared_tokenizer(config), config.data.text_length)
  batch = next(pipeline.make_train_iterator(config, tokenizer))
  value_and_grad = gradcache.value_and_grad(
      train.make_encode_fn(model), train.make_loss_fn(config),
      num_microbatches=config.batch_size // config.microbatch_size)
  return jax.jit(value_and_grad)(state.params, batch, jax.random.key(0))


_TOKENIZERS = {}


def _shared_tokenizer(config):
  if 'path' not in _TOKENIZERS:
    import tempfile
    from basic import tokenizer as tokenizer_lib
    _TOKENIZERS['path'] = tokenizer_lib.ensure_tokenizer(config, tempfile.mkdtemp())
  return _TOKENIZERS['path']


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_microbatched_train_step_matches_full_batch(loss):
  """3 AdamW steps with K=4 microbatches and a chunked loss == 3 plain full-batch steps."""
  plain = small_config(loss=loss, batch_size=32, microbatch_size=32, loss_chunk_size=0)
  cached = small_config(loss=loss, batch_size=32, microbatch_size=8, loss_chunk_size=12)
  pa, pb = _params_after(plain, 3), _params_after(cached, 3)
  init = _params_after(plain, 0)
  # Per leaf: ||b - a|| <= 1e-5 ||a|| + 1e-7 sqrt(size). The absolute floor is for leaves whose
  # true gradient is exactly zero (attention key biases: softmax is shift-invariant per query),
  # so their values are float rounding noise (~1e-9) that Adam rescales.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff, bound = np.linalg.norm(b - a), 1e-5 * np.linalg.norm(a) + 1e-7 * np.sqrt(a.size)
    assert diff <= bound, (jax.tree_util.keystr(path), diff, bound)
  total = _rel_err(np.concatenate([np.ravel(x) for x in jax.tree.leaves(pb)]),
                   np.concatenate([np.ravel(x) for x in jax.tree.leaves(pa)]))
  assert total <= 1e-5, total
  # The steps did move the parameters (so the comparison is not vacuous).
  moved = [_rel_err(a, p0) for a, p0 in zip(jax.tree.leaves(pa), jax.tree.leaves(init))]
  assert max(moved) > 1e-3
  if loss == 'sigmoid':
    assert 'bias' in pa and float(pa['bias']) != -10.0
  # The raw gradients too, every leaf, the temperature (and bias) among them.
  (loss_a, ga), (loss_b, gb) = _raw_gradients(plain), _raw_gradients(cached)
  assert abs(float(loss_b) - float(loss_a)) <= 1e-6 * abs(float(loss_a))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    name = jax.tree_util.keystr(path)
    if 'key' in name and 'bias' in name:   # Exactly 0 in exact arithmetic: rounding noise.
      assert np.abs(b - a).max() <= 1e-7, name
      continue
    assert np.linalg.norm(a) > 0 and _rel_err(b, a) <= 1e-5, (name, _rel_err(b, a))
  assert abs(float(gb['log_temperature']) - float(ga['log_temperature'])) <= 1e-5 * abs(
      float(ga['log_temperature']))


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  """SIGTERM mid-run: the current step finishes, is checkpointed, and the process exits 0."""
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'basic.train', f'--workdir={workdir}',
         '--config=configs/tiny.py', '--config.batch_size=32', '--config.microbatch_size=32',
         '--config.total_steps=100000', '--config.log_every_steps=1',
         '--config.checkpoint_every_steps=50000', '--config.eval_every_steps=50000',
         '--config.tokenizer.train_sentences=2000']
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(_train_rows(workdir)) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, 'the run ended before SIGTERM'
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  last_logged = _train_rows(workdir)[-1]['step']
  saved = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert saved == [last_logged] and 3 <= last_logged < 50000
