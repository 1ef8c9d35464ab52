"""Partition rules, model/FSDP parallelism on 8 fake CPU devices, remat, and basic.plan.

Tests that need 8 devices run tests/mesh_worker.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this process has one CPU device).
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import config_lib
from basic import sharding
from basic.models import build as build_model
from configs import tiny
import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faster CPU compilation for the subprocesses (the same flags for every run that is compared).
FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0,
                        'xla_llvm_disable_expensive_passes': True}
RTOL = 1e-5
# d loss / d (attention key bias) is exactly 0 (q . b_k shifts a softmax row by a constant), so
# these parameters hold only rounding noise (~1e-7) amplified by Adam; they are compared in
# absolute terms.
ZERO_GRAD = re.compile(r'attn/key/bias$')


def _abstract_params(config):
  model = build_model(config)
  image = jnp.zeros((2, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  text = jnp.zeros((2, config.data.text_length), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image, text)['params'])


def _mesh(data, model):
  devices = np.array(jax.devices()[:1] * (data * model), dtype=object)
  return jax.sharding.Mesh(devices.reshape(data, model), ('data', 'model'))


def _abstract_mesh(data, model):
  return jax.sharding.AbstractMesh((data, model), ('data', 'model'))


# ----------------------------------------------------------------- rules (1 device, abstract).

def test_rules_first_match_wins_and_unmatched_replicated():
  params = {'a': {'attn': {'query': {'kernel': jax.ShapeDtypeStruct((8, 4, 2), jnp.float32)}}},
            'b': {'kernel': jax.ShapeDtypeStruct((8, 6), jnp.float32)},
            'scale': jax.ShapeDtypeStruct((8,), jnp.float32)}
  rules = (('query/kernel$', (None, 'model', None)), ('attn/.*', (None, None, None)),
           ('b/kernel', ('model', None)))
  specs = sharding.param_partition_specs(params, rules, _abstract_mesh(2, 2))
  assert specs['a']['attn']['query']['kernel'] == jax.sharding.PartitionSpec(None, 'model', None)
  assert specs['b']['kernel'] == jax.sharding.PartitionSpec('model', None)
  assert specs['scale'] == jax.sharding.PartitionSpec()
  assert sharding.unmatched_params(params, rules, min_size=1) == ['scale']
  assert sharding.unmatched_params(params, rules[:1], min_size=40) == ['b/kernel']


def test_tiny_rules_unmatched_and_fsdp():
  config = tiny.get_config()
  params = _abstract_params(config)
  # The towers' rules (basic.models.sharding_rules) cover every parameter of >= 2^12 elements.
  assert sharding.unmatched_params(params, config.sharding.rules, 2**12) == []
  specs = sharding.param_partition_specs(params, config.sharding.rules, _abstract_mesh(4, 1),
                                         fsdp=True, fsdp_min_size=2**13)
  block = specs['text']['encoder']['block00']
  # Largest unsharded dimension divisible by data=4 gets 'data'; small params stay replicated.
  assert block['mlp']['fc1']['kernel'] == jax.sharding.PartitionSpec('data', 'model')
  assert block['attn']['query']['kernel'] == jax.sharding.PartitionSpec('data', 'model', None)
  assert block['ln_mlp']['scale'] == jax.sharding.PartitionSpec()
  assert specs['text']['token_embedding']['embedding'] == jax.sharding.PartitionSpec(
      'model', 'data')


@pytest.mark.parametrize('rule, message', [
    (('attn/query/kernel$', (None, 'model')), 'has 2 entries but the parameter has 3'),
    (('attn/key/kernel$', (None, 'model', None)), 'not divisible by the 3 devices'),
    (('attn/value/kernel$', (None, 'tensor', None)), "unknown mesh axis 'tensor'"),
])
def test_bad_rule_names_param_rule_and_field(rule, message):
  params = _abstract_params(tiny.get_config())   # 4 heads: not divisible by model=3.
  with pytest.raises(ValueError, match=message) as e:
    sharding.param_partition_specs(params, (rule,), _abstract_mesh(2, 3))
  assert "'image/encoder/block00/attn/" in str(e.value)
  assert repr(rule[0]) in str(e.value) and 'config.sharding.rules' in str(e.value)


def test_optimizer_state_follows_params():
  config = tiny.get_config()
  config.model.image.num_heads = config.model.text.num_heads = 4
  from basic import optim, train  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, 10)
  abstract, _ = train.abstract_train_state(config, model, tx, _mesh(1, 1))
  config.mesh.data, config.mesh.model = 2, 2
  shardings = sharding.state_shardings(abstract, _abstract_mesh(2, 2), config)
  adam = shardings.opt_state[1][0]
  kernel = ('text', 'encoder', 'block01', 'mlp', 'fc2', 'kernel')
  get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]][kernel[4]][kernel[5]]
  assert get(shardings.params).spec == jax.sharding.PartitionSpec('model', None)
  assert get(adam.mu).spec == get(adam.nu).spec == jax.sharding.PartitionSpec('model', None)
  assert adam.count.spec == jax.sharding.PartitionSpec()
  assert shardings.step.spec == jax.sharding.PartitionSpec()


def test_config_validation_of_sharding_fields():
  config = tiny.get_config()
  config.sharding.rules = (('mlp/fc1/kernel$', (None, 'tensor')),)
  with pytest.raises(config_lib.ConfigError, match=r'config.sharding.rules\[0\]'):
    config_lib.validate(config)
  config = tiny.get_config()
  config.sharding.fsdp_min_size = 0
  with pytest.raises(config_lib.ConfigError, match='config.sharding.fsdp_min_size'):
    config_lib.validate(config)


# ------------------------------------------------------------------------------------- remat.

def test_remat_policies_give_the_same_gradients():
  """remat 'full' / 'dots_saveable' vs 'none' under jit + grad, with dropout on."""
  def model_of(remat):
    config = tiny.get_config()
    for tower in ('image', 'text'):
      config.model[tower].update(remat=remat, dropout=0.1, depth=2, width=32, num_heads=2,
                                 mlp_dim=64)
    return build_model(config)

  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  text = jnp.asarray(rng.integers(1, 256, (4, 16)), jnp.int32)
  params = jax.jit(lambda: model_of('none').init(jax.random.key(0), image, text)['params'],
                   compiler_options=FAST_COMPILE_OPTIONS)()

  def grads(remat):
    def loss(p):
      a, b = model_of(remat).apply({'params': p}, image, text, train=True,
                                   rngs={'dropout': jax.random.key(1)})
      return jnp.sum(a @ b.T)
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE_OPTIONS)(params)

  reference = grads('none')
  for policy in ('full', 'dots_saveable'):
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads(policy))):
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(a))),
                                 err_msg=policy)


# ------------------------------------------------------------ 8 devices (one subprocess).

def _mesh_results(tmp_path_factory, run_all):
  out_dir = tmp_path_factory.mktemp('mesh_all' if run_all else 'mesh')
  cmd = [sys.executable, os.path.join(REPO, 'tests', 'mesh_worker.py'), str(out_dir)]
  proc = subprocess.run(cmd + (['--all'] if run_all else []), env=cpu_devices.env(8), cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return dict(np.load(os.path.join(out_dir, 'results.npz')))


@pytest.fixture(scope='module')
def mesh_results(tmp_path_factory):
  return _mesh_results(tmp_path_factory, run_all=False)


def _assert_same_training(results, variant):
  np.testing.assert_allclose(results[f'{variant}/losses'], results['single/losses'], rtol=RTOL)
  keys = [k for k in results if k.startswith(('single/params/', 'single/opt/'))]
  assert len(keys) > 100
  for key in keys:
    ref, got = results[key], results[key.replace('single', variant, 1)]
    if ref.size == 0:
      continue
    if ZERO_GRAD.search(key):
      np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=key)
    else:
      rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
      assert rel <= RTOL, (key, rel)


@pytest.mark.parametrize('variant, query_shard, mlp_shard', [
    ('mesh42', (64, 2, 16), (64, 64)),   # (data=4, model=2): heads and MLP split in 2.
    ('mesh81', (64, 4, 16), (64, 128)),  # (data=8): the loss split over 8 devices.
    ('fsdp24', (32, 1, 16), (32, 32)),   # (data=2, model=4) + FSDP over data: split 4 x 2.
])
def test_mesh_training_matches_single_device(mesh_results, variant, query_shard, mlp_shard):
  """3 AdamW steps of the gradient-cached step (K = 4, sharded loss): same losses, parameters and
  optimizer state as 1 device, relative error <= RTOL per leaf."""
  _assert_same_training(mesh_results, variant)
  assert tuple(mesh_results['single/shard/query']) == (64, 4, 16)
  assert tuple(mesh_results[f'{variant}/shard/query']) == query_shard
  assert tuple(mesh_results[f'{variant}/shard/mlp']) == mlp_shard
  assert tuple(mesh_results[f'{variant}/shard/mlp_mu']) == mlp_shard  # Adam mu like its param.


@pytest.mark.parametrize('variant', ['mesh42', 'mesh81', 'fsdp24'])
def test_mesh_raw_gradients_match_single_device(mesh_results, variant):
  """The gradient-cached step's raw gradients (before clipping and Adam, which hide constant
  factors), the temperature's among them, equal 1 device's: relative error <= 2e-6 per leaf."""
  ref_loss, got_loss = mesh_results['single/raw/loss'], mesh_results[f'{variant}/raw/loss']
  assert abs(got_loss - ref_loss) <= 1e-6 * abs(ref_loss)
  keys = [k for k in mesh_results if k.startswith('single/raw/grads/')]
  assert 'single/raw/grads/log_temperature' in keys and len(keys) > 40
  for key in keys:
    ref, got = mesh_results[key], mesh_results[key.replace('single', variant, 1)]
    if ZERO_GRAD.search(key):   # Exactly 0 in exact arithmetic: rounding noise only.
      np.testing.assert_allclose(got, ref, atol=1e-7, err_msg=key)
      continue
    assert np.linalg.norm(ref) > 0, key
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 2e-6, (key, rel)


def _tiny_cli_losses(workdir, num_devices, *flags):
  """train/loss rows of `python -m basic.train` on the tiny default, 20 steps, no evaluation."""
  cmd = [sys.executable, '-m', 'basic.train', '--config=configs/tiny.py', f'--workdir={workdir}',
         '--config.total_steps=20', '--config.log_every_steps=5', '--config.eval.zeroshot=False',
         '--config.checkpoint_every_steps=20', *flags]
  proc = subprocess.run(cmd, env=cpu_devices.env(num_devices), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return np.array([r['train/loss'] for r in rows if 'train/loss' in r]), proc.stderr


def test_tiny_default_trains_on_a_model_parallel_mesh_like_one_device(tmp_path):
  """The embedded default (4 heads, vocabulary 256, MLP 192: all divide a model axis of 2 or 4)
  on a (data 4, model 2) mesh of 8 devices, the loss sharded over all 8: the losses of 20 steps
  equal 1 device's (relative error <= 1e-4)."""
  one, _ = _tiny_cli_losses(tmp_path / 'one', 1)
  mesh, log = _tiny_cli_losses(tmp_path / 'mesh', 8, '--config.mesh.data=4',
                               '--config.mesh.model=2')
  assert len(one) == 4 and np.all(np.isfinite(one))
  np.testing.assert_allclose(mesh, one, rtol=1e-4)
  assert "mesh axes ('data', 'model') (8 devices)" in log   # The loss was sharded over 8.


@pytest.mark.parametrize('target, num_devices', [('restore81', 8), ('restore1', 1)])
def test_checkpoint_from_4x2_mesh_restores_elsewhere(mesh_results, target, num_devices):
  assert int(mesh_results[f'{target}/num_devices']) == num_devices
  saved = [k for k in mesh_results if k.startswith('saved/state/')]
  assert len(saved) > 100
  for key in saved:
    np.testing.assert_array_equal(mesh_results[key.replace('saved', target, 1)],
                                  mesh_results[key], err_msg=key)


@pytest.mark.slow
def test_more_meshes_match_single_device(tmp_path_factory):
  results = _mesh_results(tmp_path_factory, run_all=True)
  for variant in ('mesh42', 'fsdp24', 'mesh24', 'fsdp42'):
    _assert_same_training(results, variant)
  assert tuple(results['mesh24/shard/query']) == (64, 1, 16)
  assert tuple(results['fsdp42/shard/query']) == (16, 2, 16)


# -------------------------------------------------------------------------------- basic.plan.

def test_plan_tiny_prints_param_counts_and_memory():
  proc = subprocess.run(
      [sys.executable, '-m', 'basic.plan', '--config=configs/tiny.py', '--devices=8'],
      env=cpu_devices.env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  lines = dict(line.split(': ', 1) for line in proc.stdout.splitlines() if ': ' in line)
  assert lines['params/total'] == '432769'
  assert int(lines['params/image_tower']) + int(lines['params/text_tower']) + 1 == 432769
  assert "{'data': 8, 'model': 1} on 8 devices" in lines['mesh']
  # The loss split over the 8 devices, 32 rows each, in one automatic block.
  assert lines['loss/devices'] == '8' and lines['loss/chunk_size'] == '32'
  for key in ('arguments', 'outputs', 'temporaries', 'total'):
    assert float(lines[f'memory/{key}_gib']) > 0


_EMBEDDING_CHECK = r'''
import json, sys
from basic import plan, sharding
from configs import tiny
c = tiny.get_config()
c.data.source = 'synthetic'
c.sharding.fsdp, c.sharding.fsdp_min_size = True, 2**10   # The token embedding is FSDP-sharded.
c.batch_size, c.microbatch_size = 256, 128
c.model.text.width, c.model.text.mlp_dim, c.model.text.num_heads = 256, 1024, 4
fixed = plan.plan(c)['memory/temporaries_gib']
sharding.constrain_batch = lambda x: x
print(json.dumps({'fixed': fixed, 'unconstrained': plan.plan(c)['memory/temporaries_gib']}))
'''


def test_text_tower_runs_its_share_of_the_batch_under_fsdp():
  """With an FSDP-sharded token table, the text activations stay sharded over 'data'.

  Without `sharding.constrain_batch` after the lookup, the gather takes the table's layout and
  every device runs the whole microbatch (BASIC-L: 170 -> 60 GiB per device; BENCHMARKS.md).
  Here (8 devices, text width 256) that shows as > 1.6x the XLA temporaries.
  """
  proc = subprocess.run([sys.executable, '-c', _EMBEDDING_CHECK], env=cpu_devices.env(8),
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['unconstrained'] > 1.6 * result['fixed'], result


_HOIST_CHECK = r'''
import json
import jax
from basic import plan
from configs import tiny
c = tiny.get_config()
c.sharding.fsdp, c.sharding.fsdp_min_size = True, 2**10   # Every matrix FSDP-sharded.
c.batch_size, c.microbatch_size = 64, 16                   # K = 4 microbatches.
for tower in (c.model.image, c.model.text):
  tower.width, tower.mlp_dim, tower.num_heads, tower.depth = 256, 1024, 4, 2
out = plan.plan(c)
barrier = out['memory/temporaries_gib']
jax.lax.optimization_barrier = lambda x: x                  # gradcache without its barriers.
hoisted = plan.plan(c)['memory/temporaries_gib']
print(json.dumps({'params': out['params/total'], 'barrier': barrier * 2**30,
                  'hoisted': hoisted * 2**30}))
'''


def test_gradcache_loops_gather_fsdp_weights_per_microbatch():
  """The microbatch loops carry the parameters behind an optimization barrier, so XLA cannot
  hoist the FSDP all-gathers out of them: without it the step holds one more whole gathered
  float32 model in its temporaries (8 devices, 3.3M parameters = 13.3 MB: 40.7 vs 28.5 MB;
  CLIPA-v2 H/14 at 256 devices: 11.89 -> 9.03 GiB per device, BENCHMARKS.md)."""
  proc = subprocess.run([sys.executable, '-c', _HOIST_CHECK], env=cpu_devices.env(8),
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  model_bytes = 4 * result['params']
  assert result['hoisted'] - result['barrier'] >= 0.8 * model_bytes, result
