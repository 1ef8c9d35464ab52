"""The sharded contrastive losses (basic.contrastive_sharded) equal the single-device ones.

The 8-device comparisons run tests/loss_shard_worker.py in a subprocess (8 fake CPU devices);
the gradient-cached train step with the sharded loss is compared with 1 device in
tests/test_sharding.py (tests/mesh_worker.py). Tolerances: value and every gradient within 1e-6
relative (float32, precision 'highest'); the README states the same.
"""
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from basic import config_lib
from basic import contrastive
from basic import contrastive_sharded
from basic import train
from configs import tiny
import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-6


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp('loss_shard')
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'loss_shard_worker.py'),
                         str(out_dir)], env=cpu_devices.env(8), cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return dict(np.load(os.path.join(out_dir, 'results.npz')))


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(got - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize('mesh', ['data8', 'data4_model2'])
@pytest.mark.parametrize('loss, num_args', [('softmax', 3), ('sigmoid', 4)])
@pytest.mark.parametrize('chunk', [8, 3])   # N / P rows per device; a non-divisor of them.
def test_sharded_loss_equals_single_device(results, mesh, loss, num_args, chunk):
  prefix, ref = f'loss/{mesh}/{loss}/c{chunk}', f'loss/ref/{loss}/c{chunk}'
  assert _rel(results[f'{prefix}/value'], results[f'{ref}/value']) <= RTOL
  for i in range(num_args):   # image_emb, text_emb, temperature (, bias).
    ref_grad = results[f'{ref}/grad{i}']
    assert np.linalg.norm(ref_grad) > 0
    assert results[f'{prefix}/grad{i}'].shape == ref_grad.shape
    assert _rel(results[f'{prefix}/grad{i}'], ref_grad) <= RTOL, (prefix, i)


def test_sharded_loss_does_an_eighth_of_the_work_per_device(results):
  """Compiled per-device FLOPs of value-and-grad on 8 devices, one c x N block per device on both
  sides (loops of trip count 1): sharded 8 n N d against replicated 10 N^2 d, i.e. 1/10."""
  ratio = results['flops/sharded'] / results['flops/replicated']
  assert 1 / 16 <= ratio <= 1 / 6, ratio
  # cost_analysis counts a loop body once: two blocks per device "cost" less. Hence one block
  # per device above (else both sides would report one chunk and the ratio would prove nothing).
  assert results['flops/sharded_two_blocks'] < 0.8 * results['flops/sharded']


def _max_intermediate_size(jaxpr):
  """Largest number of elements of any equation output, sub-jaxprs (shard_map bodies: per
  device shapes) included."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      biggest = max(biggest, int(np.prod(getattr(var.aval, 'shape', ()), dtype=np.int64)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      biggest = max(biggest, _max_intermediate_size(sub))
  return biggest


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_sharded_never_materialises_n_by_n(loss):
  n, d, devices, chunk = 4096, 16, 8, 128
  mesh = jax.sharding.AbstractMesh((devices,), ('data',))
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  t = jax.ShapeDtypeStruct((), jnp.float32)
  extra = (-10.,) if loss == 'sigmoid' else ()

  def largest(fn):
    grad = jax.grad(lambda a, b, temp: fn(a, b, temp, *extra), argnums=(0, 1, 2))
    return _max_intermediate_size(jax.make_jaxpr(grad)(x, x, t).jaxpr)

  sharded = getattr(contrastive_sharded, f'{loss}_loss')
  plain = getattr(contrastive, f'{loss}_loss')
  assert largest(plain) >= n * n // 2   # The check can fail.
  size = largest(lambda *a: sharded(*a, mesh=mesh, axes='data', chunk_size=chunk))
  assert size <= chunk * n
  # One block per device: the n / P x N block, never N x N.
  size = largest(lambda *a: sharded(*a, mesh=mesh, axes='data', chunk_size=n // devices))
  assert size <= n * n // devices


def _abstract(data, model):
  return jax.sharding.AbstractMesh((data, model), ('data', 'model'))


def test_loss_axes_and_chunk_size():
  config = tiny.get_config()
  config.batch_size = 65536
  assert train.loss_axes(config) == ()
  assert train.loss_axes(config, _abstract(8, 1)) == ('data',)
  assert train.loss_axes(config, _abstract(4, 2)) == ('data', 'model')
  assert train.loss_axes(config, _abstract(1, 2)) == ('model',)
  # Automatic c: 3 float32 c x N buffers within 256 MiB -> 341 rows -> 256 (multiple of 128).
  assert config.loss_chunk_size == -1 and config.loss_chunk_budget_mib == 256
  assert train.loss_chunk_size(config) == 256
  assert train.loss_chunk_size(config, _abstract(512, 1)) == 128   # n = 128 rows per device.
  config.loss_chunk_budget_mib = 1
  assert train.loss_chunk_size(config) == 1
  config.loss_chunk_size = 0   # The unchunked reference, asked for explicitly.
  assert train.loss_chunk_size(config) == 0
  assert train.loss_chunk_size(config, _abstract(4, 2)) == 65536 // 8
  config.loss_chunk_size = 1024
  assert train.loss_chunk_size(config, _abstract(4, 2)) == 1024
  config.loss_sharding = 'replicated'
  assert train.loss_axes(config, _abstract(4, 2)) == ()
  assert train.loss_chunk_size(config, _abstract(4, 2)) == 1024
  config.batch_size = 36   # Not divisible by 8 devices: the data axis alone (4 divides 36).
  config.loss_sharding = 'sharded'
  assert train.loss_axes(config, _abstract(4, 2)) == ('data',)


@pytest.mark.parametrize('field, value, message', [
    ('loss_precision', 'bf16', "config.loss_precision='bf16'"),
    ('loss_sharding', 'ring', "config.loss_sharding='ring'"),
    ('loss_chunk_size', -2, 'config.loss_chunk_size=-2'),
    ('loss_chunk_budget_mib', 0, 'config.loss_chunk_budget_mib=0'),
])
def test_bad_loss_fields_name_the_field(field, value, message):
  config = tiny.get_config()
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[')):
    config_lib.validate(config)


@pytest.mark.parametrize('precision', ['high', 'default'])
def test_precision_reaches_the_logits_matmul(precision):
  x = jax.ShapeDtypeStruct((64, 8), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda a, b: contrastive.softmax_loss(
      a, b, 0.1, chunk_size=16, precision=precision))(x, x))
  names = {'high': 'HIGH', 'default': 'DEFAULT'}
  assert f'Precision.{names[precision]}' in jaxpr or f'precision={names[precision]}' in jaxpr
  assert 'HIGHEST' not in jaxpr
