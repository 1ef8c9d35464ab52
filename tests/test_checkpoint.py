"""Checkpoints that survive pods: retention, self-description, corrupt steps, kill -9 at random
moments (also mid-save), non-finite guard, soups, and gs:// against a local GCS emulator."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import checkpoint as checkpoint_lib
from basic import metric_writers
from basic import optim
from basic import sharding
from basic import soup
from basic import train
from basic.models import build as build_model
from tests import gcs_emulator as gcs_emulator_lib
from tests.test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def _template(config):
  model = build_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  state, _ = train.create_train_state(config, model, tx, sharding.make_mesh(config.mesh))
  return state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  config = small_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_keeps_last_k_plus_every_mth_step(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_period=4)
  config = small_config()
  for step in range(1, 11):
    ckpt.save(step, {'w': jnp.full((3,), step, jnp.float32)}, config)
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  assert float(ckpt.restore(None, 8)['w'][0]) == 8.0
  ckpt.close()


def test_checkpoint_describes_itself(trained_run):
  config, workdir = trained_run
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  assert ckpt.all_steps() == [3, 6]
  as_json = lambda c: json.loads(json.dumps(c.to_dict(), default=list))   # tuples -> lists.
  assert as_json(ckpt.restore_config(6)) == as_json(config)
  with open(os.path.join(workdir, 'tokenizer', 'spm.model'), 'rb') as f:
    assert ckpt.restore_tokenizer(6) == f.read()
  data = ckpt.restore_data(6)
  assert data['process_count'] == 1 and data['dropped'] == [0] and data['positions'][0] > 0
  base = np.asarray(jax.random.key_data(jax.random.key(config.seed + 1)))
  assert data['rng'] == base.tolist()
  # One step directory alone is enough: find_step_dir maps it to (checkpoints dir, step).
  assert checkpoint_lib.find_step_dir(os.path.join(workdir, 'checkpoints', '3')) == (
      os.path.join(workdir, 'checkpoints'), 3)
  assert checkpoint_lib.find_step_dir(workdir) == (os.path.join(workdir, 'checkpoints'), None)


def test_corrupt_latest_checkpoint_is_skipped_and_run_stays_exact(trained_run, tmp_path):
  """Step 6's array files are truncated after commit: the rerun warns, moves step 6 aside,
  resumes from step 3 and ends with exactly the parameters the intact step 6 had."""
  config, workdir = trained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  template = _template(config)
  intact = checkpoint_lib.Checkpointer(os.path.join(copy, 'checkpoints'), read_only=True)
  want = intact.restore(template, 6).params
  truncated = 0
  for path in glob.glob(os.path.join(copy, 'checkpoints', '6', 'state', '**', 'd', '*'),
                        recursive=True):
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
    truncated += 1
  assert truncated
  train.train_and_evaluate(config, copy)
  moved = os.listdir(os.path.join(copy, 'checkpoints', checkpoint_lib.CORRUPT_DIR))
  assert len(moved) == 1 and moved[0].startswith('6-')
  ckpt = checkpoint_lib.Checkpointer(os.path.join(copy, 'checkpoints'), read_only=True)
  assert ckpt.all_steps() == [3, 6]
  _assert_trees_close(ckpt.restore(template, 6).params, want)
  rows = metric_writers.read_jsonl(os.path.join(copy, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6]   # one history.


def test_uniform_soup_is_the_average(trained_run, tmp_path):
  config, workdir = trained_run
  steps = os.path.join(workdir, 'checkpoints')
  result = soup.make_soup([os.path.join(steps, '3'), os.path.join(steps, '6')],
                          str(tmp_path / 'soup'))
  assert result['step'] == 6 and len(result['used']) == 2
  ckpt = checkpoint_lib.Checkpointer(steps, read_only=True)
  p3, p6 = ckpt.restore_params(3), ckpt.restore_params(6)
  out = checkpoint_lib.Checkpointer(str(tmp_path / 'soup'), read_only=True)
  mixed = out.restore_params()
  expected = jax.tree.map(
      lambda a, b: ((np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2), p3, p6)
  _assert_trees_close(mixed, expected, rtol=1e-7, atol=1e-8)
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
             for a, b in zip(_leaves(p3), _leaves(p6)))   # not a soup of equals.
  assert out.restore_tokenizer() == ckpt.restore_tokenizer(6)
  assert out.restore_config().model.embed_dim == config.model.embed_dim


def test_greedy_soup_with_the_zeroshot_metric(trained_run, tmp_path):
  """The default greedy metric (held-out zero-shot top-1) scores step 6 as training's own
  evaluation did, and the soup it keeps scores no lower than its best ingredient."""
  config, workdir = trained_run
  steps = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoint_lib.Checkpointer(steps, read_only=True)
  metric = soup.zeroshot_metric(config, ckpt.restore_tokenizer(6))
  scores = {step: metric(ckpt.restore_params(step)) for step in (3, 6)}
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  (trained,) = [r['zeroshot/top1'] for r in rows if 'zeroshot/top1' in r and r['step'] == 6]
  assert abs(scores[6] - trained) <= 1 / 40 + 1e-9    # 40 images: at most one near-tie flips.
  result = soup.make_soup([os.path.join(steps, '3'), os.path.join(steps, '6')],
                          str(tmp_path / 'greedy'), method='greedy')
  best = max(scores.values())
  assert scores[int(os.path.basename(result['used'][0]))] == best   # starts from the best.
  mixed = checkpoint_lib.Checkpointer(str(tmp_path / 'greedy'), read_only=True).restore_params()
  assert metric(mixed) >= best


def test_greedy_soup_keeps_only_ingredients_that_help():
  trees = [{'w': np.array([0.0, 0.0])}, {'w': np.array([2.0, 2.0])},
           {'w': np.array([1.0, 1.0])}, {'w': np.array([9.0, -9.0])}]
  target = np.array([1.5, 1.5])
  metric = lambda t: -float(np.abs(t['w'] - target).sum())
  params, used = soup.greedy(trees, metric)
  # Best alone: [2,2] (1.0 away) then [1,1] (avg [1.5,1.5]: exact) accepted; [0,0] -> avg
  # [1,1] worse: rejected; [9,-9] rejected.
  assert used == [1, 2]
  np.testing.assert_allclose(params['w'], target)


def test_nan_at_step_stops_naming_step_and_last_checkpoint(tmp_path):
  config = small_config(total_steps=8, checkpoint_every_steps=2, eval_every_steps=8,
                        debug_nan_at_step=5)
  config.eval.zeroshot = False
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteLossError,
                     match=r'at step 5; the last good checkpoint is step 4 in '):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_nan_at_step_is_skipped_and_counted(tmp_path):
  config = small_config(total_steps=6, log_every_steps=1, checkpoint_every_steps=1,
                        keep_checkpoints=10, eval_every_steps=6, debug_nan_at_step=5,
                        on_nonfinite='skip')
  config.eval.zeroshot = False
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = {r['step']: r for r in metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}
  assert [rows[s]['train/nonfinite_skipped'] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
  assert np.isnan(rows[5]['train/loss']) and np.isfinite(rows[6]['train/loss'])
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  template = _template(config)
  s4, s5, s6 = (ckpt.restore(template, s) for s in (4, 5, 6))
  _assert_trees_close(s5.params, s4.params, rtol=0, atol=0)          # update 5 skipped ...
  _assert_trees_close(s5.opt_state, s4.opt_state, rtol=0, atol=0)
  assert int(s5.step) == 5                                            # ... the step counted,
  assert max(np.abs(a - b).max() for a, b in zip(_leaves(s6.params), _leaves(s5.params))) > 0
  assert ckpt.restore_data(6)['nonfinite_skipped'] == 1               # and saved for resume.


# --- kill -9 and resume, in subprocesses. --------------------------------------------------------

# Dropout in both towers and random image-token masking (FLIP-style, drawn from the step's rng:
# fold_in(run rng, step), microbatch k fold_in(that, k)): every step's loss depends on the rng a
# resume restores, so a resume that restored it wrongly would fail the comparison.
KILL_FLAGS = ['--config=configs/tiny.py', '--config.batch_size=32', '--config.microbatch_size=16',
              '--config.total_steps=12', '--config.log_every_steps=1',
              '--config.checkpoint_every_steps=2', '--config.eval_every_steps=12',
              '--config.data.synthetic.eval_per_class=2', '--config.tokenizer.train_sentences=2000',
              '--config.model.image.dropout=0.1', '--config.model.text.dropout=0.1',
              '--config.model.image.mask.kind=random', '--config.model.image.mask.ratio=0.25']


def _train_cmd(workdir, *extra):
  return [sys.executable, '-m', 'basic.train', f'--workdir={workdir}', *KILL_FLAGS, *extra]


def _losses(workdir):
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def _tmp_dirs(ckpt_dir):
  return glob.glob(os.path.join(ckpt_dir, '*orbax-checkpoint-tmp*'))


def _committed_steps(ckpt_dir):
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _stop(proc, timeout=10.0):
  """SIGSTOPs `proc` and waits until the kernel reports it stopped (state T): from then on none
  of its threads (orbax's async commit among them) changes a file."""
  proc.send_signal(signal.SIGSTOP)
  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(f'/proc/{proc.pid}/stat') as f:
      if f.read().rsplit(')', 1)[1].split()[0] in ('T', 't'):
        return
    time.sleep(0.001)
  raise AssertionError(f'process {proc.pid} did not stop')


def _kill_once(workdir, mode, rng):
  """Starts the run and SIGKILLs it once it trains: 'random' = at a random moment; 'save' = in
  the middle of a checkpoint save: as soon as an uncommitted step directory (orbax's
  `N.orbax-checkpoint-tmp-*`) appears, the process is frozen (SIGSTOP) and, if the directory
  is still uncommitted, killed (else resumed until the next save). -> None if the run ended
  before a kill; else the uncommitted step directories the kill left (always some for 'save')."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  before = len(_losses(workdir)) if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else 0
  proc = subprocess.Popen(_train_cmd(workdir), cwd=REPO, env=SUBPROCESS_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  delay = rng.uniform(0.0, 1.0)
  trained_at = None
  while time.time() < deadline and proc.poll() is None:
    if trained_at is None and os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      if len(_losses(workdir)) > before:
        trained_at = time.time()
    if trained_at is not None:
      if mode == 'save' and _tmp_dirs(ckpt_dir):
        _stop(proc)
        if _tmp_dirs(ckpt_dir):
          break
        proc.send_signal(signal.SIGCONT)   # Committed just before the stop: the next save.
      if mode == 'random' and time.time() - trained_at >= delay:
        break
    time.sleep(0.005)
  if proc.poll() is not None:
    return None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return sorted(os.path.basename(d) for d in _tmp_dirs(ckpt_dir))


def test_kill9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
  """Two kill -9s, one at a random moment and one in the middle of a checkpoint save (the
  process is frozen while orbax's temporary step directory is uncommitted, then killed: the
  save was really interrupted), each followed by the same command. The run has dropout and
  random image-token masking, so every step depends on the rng the resume restores. The loss
  of every step (1..12) and the final train state equal an uninterrupted run's (<= 1e-6
  relative); the interrupted step is never taken as committed, and no half-written checkpoint
  is left behind once the run has finished."""
  straight = str(tmp_path / 'straight')
  subprocess.run(_train_cmd(straight), cwd=REPO, env=SUBPROCESS_ENV, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed = str(tmp_path / 'killed')
  ckpt_dir = os.path.join(killed, 'checkpoints')
  rng = random.Random(0)
  assert _kill_once(killed, 'random', rng) is not None
  interrupted = _kill_once(killed, 'save', rng)
  assert interrupted, 'the run ended without a save to interrupt'
  steps = {int(name.split('.')[0]) for name in interrupted}
  assert not steps & set(_committed_steps(ckpt_dir)), (interrupted, _committed_steps(ckpt_dir))
  subprocess.run(_train_cmd(killed), cwd=REPO, env=SUBPROCESS_ENV, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  want, got = _losses(straight), _losses(killed)
  assert sorted(got) == list(range(1, 13)) == sorted(want)
  rel = max(abs(got[s] - want[s]) / abs(want[s]) for s in range(1, 13))
  print(f'interrupted save: {interrupted}; max relative loss difference {rel:.2e}')
  np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)],
                             rtol=1e-6)
  assert not _tmp_dirs(ckpt_dir)
  config = small_config(total_steps=12)
  template = _template(config)
  a = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
  b = checkpoint_lib.Checkpointer(os.path.join(straight, 'checkpoints'), read_only=True)
  _assert_trees_close(a.restore(template, 12), b.restore(template, 12))


# --- gs:// against a local GCS emulator. --------------------------------------------------------


@pytest.fixture
def gcs_emulator():
  """A GCS emulator on 127.0.0.1 with bucket 'basic-test'; yields the env that points every
  storage client at it (see README, 'Checkpoints on GCS')."""
  pytest.importorskip('gcp_storage_emulator')
  with gcs_emulator_lib.serve('basic-test') as url:
    yield dict(SUBPROCESS_ENV, EPATH_USE_TF='false', STORAGE_EMULATOR_HOST=url,
               TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING='x',
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')


_READ_BACK = r'''
import json, sys
import jax
import numpy as np
from basic import checkpoint, metric_writers, sharding
path = sys.argv[1]
directory, step = checkpoint.find_step_dir(path)
ckpt = checkpoint.Checkpointer(directory, read_only=True)
step = ckpt.latest_step()
params = ckpt.restore_params(step)
if len(sys.argv) > 2:   # The parameters, by path, to an .npz file.
  np.savez(sys.argv[2], **{sharding.path_str(p): np.asarray(x)
                           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]})
print(json.dumps({
    'directory': directory, 'step': step, 'steps': ckpt.all_steps(),
    'temperature': float(params['log_temperature']),
    'tokenizer_bytes': len(ckpt.restore_tokenizer(step)),
    'embed_dim': ckpt.restore_config(step).model.embed_dim,
    'positions': ckpt.restore_data(step)['positions'],
    'losses': {r['step']: r['train/loss'] for r in metric_writers.read_jsonl(
        path + '/metrics.jsonl') if 'train/loss' in r}}))
'''


def test_gcs_train_interrupted_resumed_equals_uninterrupted_local_run(gcs_emulator, tmp_path):
  """A run on gs:// (dropout and random token masking on, as in the kill -9 test) fails at step
  5 (debug_raise_at_step) after its step-4 checkpoint; a fresh process finds that checkpoint on
  its own; the same command without the failure resumes from gs://.../checkpoints/4. Every
  logged loss (steps 1..6) and the final parameters equal an uninterrupted local run's
  (<= 1e-6 relative; parameters also <= 1e-7 absolute)."""
  flags = ['--config.total_steps=6', '--config.checkpoint_every_steps=2',
           '--config.eval_every_steps=6']
  local = str(tmp_path / 'local')
  subprocess.run(_train_cmd(local, *flags), cwd=REPO, env=SUBPROCESS_ENV, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  workdir = 'gs://basic-test/runs/tiny'
  run = lambda *extra: subprocess.run(
      _train_cmd(workdir, *flags, f'--tensorboard_dir={tmp_path / "tb"}', *extra), cwd=REPO,
      env=gcs_emulator, capture_output=True, text=True, timeout=600)
  failed = run('--config.debug_raise_at_step=5')
  assert failed.returncode != 0 and 'debug_raise_at_step=5' in failed.stderr, \
      failed.stderr[-3000:]
  read = lambda *out: json.loads(subprocess.run(
      [sys.executable, '-c', _READ_BACK, workdir, *out], cwd=REPO, env=gcs_emulator,
      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
  first = read()   # A fresh process, as on a new VM: finds the latest step on its own.
  assert first['directory'] == workdir + '/checkpoints'
  assert first['step'] == 4 and first['steps'] == [2, 4] and first['embed_dim'] == 64
  assert first['tokenizer_bytes'] > 1000 and len(first['positions']) == 1   # Its stream cursor.
  assert sorted(map(int, first['losses'])) == [1, 2, 3, 4]
  assert glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
  resumed = run()   # Resumes from gs://.../checkpoints/4.
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from checkpoint step 4' in resumed.stderr
  second = read(str(tmp_path / 'gcs_params.npz'))
  assert second['step'] == 6 and second['temperature'] != first['temperature']
  got = {int(k): v for k, v in second['losses'].items()}
  want = _losses(local)
  assert sorted(got) == sorted(want) == list(range(1, 7))
  rel = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
  print(f'gs:// resumed vs local: max relative loss difference {rel:.2e}')
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                             rtol=1e-6)
  gcs_params = np.load(str(tmp_path / 'gcs_params.npz'))
  local_ckpt = checkpoint_lib.Checkpointer(os.path.join(local, 'checkpoints'), read_only=True)
  local_params = {sharding.path_str(p): np.asarray(x) for p, x in
                  jax.tree_util.tree_flatten_with_path(local_ckpt.restore_params(6))[0]}
  assert sorted(gcs_params.files) == sorted(local_params) and len(local_params) > 40
  for key, value in local_params.items():
    np.testing.assert_allclose(gcs_params[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_init_from_starts_a_new_run_from_a_checkpoint(trained_run, tmp_path):
  config, workdir = trained_run
  trained = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                        read_only=True).restore_params(6)
  stage2 = small_config(total_steps=1, eval_every_steps=1, init_from=workdir)
  stage2.optimizer.learning_rate = 1e-20   # one step that moves nothing measurably.
  stage2.eval.zeroshot = False
  train.train_and_evaluate(stage2, str(tmp_path / 'stage2'))
  after = checkpoint_lib.Checkpointer(str(tmp_path / 'stage2' / 'checkpoints'),
                                      read_only=True).restore_params(1)
  _assert_trees_close(after, trained, rtol=1e-6, atol=1e-8)
  fresh = _template(stage2).params
  assert max(np.abs(a - b).max() for a, b in zip(_leaves(fresh), _leaves(trained))) > 1e-4
  # A model the checkpoint does not fit fails naming the parameter.
  other = small_config(total_steps=1, init_from=workdir, **{'model.embed_dim': 32})
  with pytest.raises(ValueError, match=r'image_proj/kernel has shape \(96, 64\)'):
    train.train_and_evaluate(other, str(tmp_path / 'other'))
