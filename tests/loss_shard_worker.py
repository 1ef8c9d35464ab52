"""Subprocess worker for tests/test_contrastive_sharded.py: runs with 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/loss_shard_worker.py OUT_DIR

Writes OUT_DIR/results.npz with
* loss/<mesh>/<loss>/c<c>/{value,grad<i>} and loss/ref/<loss>/c<c>/...: the sharded loss
  (basic.contrastive_sharded) on 8 devices and the single-device chunked loss, value and the
  gradients of every argument (embeddings, temperature, bias);
* flops/{sharded,replicated}: compiled per-device FLOPs of the loss's value and gradients on 8
  devices, each with one c x N block per device, so every loop has trip count 1 and
  cost_analysis (which counts a loop body once) counts everything;
  flops/sharded_two_blocks: the same with two blocks per device, to show that count.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from basic import contrastive
from basic import contrastive_sharded

N, D = 64, 16
TEMPERATURE, BIAS = 0.05, -3.0


def embeddings(n, d, seed):
  """Two (n, d) float32 arrays of L2-normalised rows."""
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(2, n, d))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  return np.float32(x), np.float32(y)


def _args(loss):
  x, y = embeddings(N, D, seed=1)
  extra = (np.float32(BIAS),) if loss == 'sigmoid' else ()
  return (x, y, np.float32(TEMPERATURE)) + extra


def _value_and_grads(f, args, in_shardings=None):
  g = jax.value_and_grad(f, argnums=tuple(range(len(args))))
  value, grads = jax.jit(g, in_shardings=in_shardings)(*args)
  return value, grads


def loss_results(devices):
  out = {}
  meshes = {'data8': (jax.sharding.Mesh(np.array(devices).reshape(8, 1), ('data', 'model')),
                      ('data',)),
            'data4_model2': (jax.sharding.Mesh(np.array(devices).reshape(4, 2),
                                               ('data', 'model')), ('data', 'model'))}
  for loss in ('softmax', 'sigmoid'):
    args = _args(loss)
    plain = getattr(contrastive, f'{loss}_loss')
    sharded = getattr(contrastive_sharded, f'{loss}_loss')
    for c in (8, 3):   # N / 8 (one block per device) and a non-divisor of the 8 rows.
      value, grads = _value_and_grads(lambda *a, c=c: plain(*a, chunk_size=c), args)
      out[f'loss/ref/{loss}/c{c}/value'] = np.asarray(value)
      for i, g in enumerate(grads):
        out[f'loss/ref/{loss}/c{c}/grad{i}'] = np.asarray(g)
      for name, (mesh, axes) in meshes.items():
        rows = NamedSharding(mesh, P('data'))
        shardings = (rows, rows) + (NamedSharding(mesh, P()),) * (len(args) - 2)
        f = lambda *a, c=c, mesh=mesh, axes=axes: sharded(*a, mesh=mesh, axes=axes, chunk_size=c)
        value, grads = _value_and_grads(f, args, shardings)
        out[f'loss/{name}/{loss}/c{c}/value'] = np.asarray(value)
        for i, g in enumerate(grads):
          out[f'loss/{name}/{loss}/c{c}/grad{i}'] = np.asarray(g)
  return out


def _flops(f, args, shardings):
  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)),
                     in_shardings=shardings).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def flops_results(devices):
  n, d = 512, 64
  mesh = jax.sharding.Mesh(np.array(devices).reshape(8, 1), ('data', 'model'))
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  t = jax.ShapeDtypeStruct((), jnp.float32)
  rows, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  sharded = lambda c: lambda a, b, temp: contrastive_sharded.softmax_loss(
      a, b, temp, mesh=mesh, axes=('data',), chunk_size=c)

  def replicated(a, b, temp):   # What make_loss_fn does with loss_sharding='replicated'.
    a, b = jax.lax.with_sharding_constraint((a, b), rep)
    return contrastive.softmax_loss(a, b, temp, chunk_size=n)

  return {'flops/sharded': _flops(sharded(n // 8), (x, x, t), (rows, rows, rep)),
          'flops/sharded_two_blocks': _flops(sharded(n // 16), (x, x, t), (rows, rows, rep)),
          'flops/replicated': _flops(replicated, (x, x, t), (rows, rows, rep))}


def main(out_dir):
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  out.update(loss_results(devices))
  out.update(flops_results(devices))
  np.savez(os.path.join(out_dir, 'results.npz'), **out)


if __name__ == '__main__':
  main(sys.argv[1])
