"""Subprocess worker for tests/test_freeze.py: a locked image tower on 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/freeze_mesh_worker.py

Trains 3 steps of a small config (K = 4 microbatches, config.lock_image with the last block
unlocked; the text tower fully trained) on one device and on a (4, 2) ('data', 'model') mesh
with FSDP; prints OK when every parameter agrees within 1e-5 (relative, per leaf, as float64)
(attention key biases, whose exact gradient is 0: within 1e-5 absolute) and each run's frozen
leaves are bit-identical to its initial ones; else raises.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from basic import freeze
from basic import sharding
from basic import train
from tests import mesh_worker


def run(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  model, tx, schedule, state, shardings = train.init_training(config, mesh)
  first = jax.device_get(state.params)
  step = train.jit_train_step(config, model, tx, schedule, mesh, shardings)
  for batch in mesh_worker.batches(config):
    state, _ = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
  return first, jax.device_get(state.params)


def main():
  results = {}
  for shape in ((1, 1), (4, 2)):
    config = mesh_worker.small_config(*shape, fsdp=shape != (1, 1))
    config.model.image.depth = 2
    config.lock_image = True
    config.lock_image_unlocked_blocks = 1
    devices = jax.devices()[:shape[0] * shape[1]]
    results[shape] = run(config, devices)
  mask = freeze.trainable(results[(1, 1)][0], freeze.rules(config))
  frozen = [m is False for m in jax.tree.leaves(mask)]
  assert sum(frozen) > 5, sum(frozen)
  for shape, (first, last) in results.items():
    for f, a, b in zip(frozen, jax.tree.leaves(first), jax.tree.leaves(last)):
      assert np.array_equal(a, b) == f, (shape, f)
  one, mesh = (jax.tree_util.tree_flatten_with_path(results[s][1])[0] for s in ((1, 1), (4, 2)))
  for (path, a), (_, b) in zip(one, mesh):
    name = sharding.path_str(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if name.endswith('attn/key/bias'):   # Zero gradient in exact arithmetic: Adam moves it by
      assert np.max(np.abs(a - b)) <= 1e-5, name   # rounding noise (as tests/test_sharding.py).
    else:
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), (name, np.linalg.norm(a - b))
  print('OK')


if __name__ == '__main__':
  main()
