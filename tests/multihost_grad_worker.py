"""Subprocess worker for tests/test_multihost.py: the raw gradients of one gradient-cached step.

  python tests/multihost_grad_worker.py OUT.npz FIELDS_JSON                    # one process
  python tests/multihost_grad_worker.py OUT.npz FIELDS_JSON ADDR NUM_PROC ID   # one of several

FIELDS_JSON: the tiny config's overridden fields ({"mesh.data": 4, ...}, as tests/config_helpers).
With ADDR (host:port of process 0's coordinator) the process joins a jax.distributed run through
basic.multihost.initialize (gloo collectives), as basic.train does. Every process builds the
same initial state (from config.seed) and the same global batch of random images and tokens
(train.random_batch, seed 0), feeds only its own rows (`sharding.global_batch`, process i holds rows
[i * N / P, (i + 1) * N / P) as the input pipeline's host shards are laid out), and computes
the gradient-cached (loss, gradients) of the step at state.step = 0, exactly as
`train.make_train_step` does before clipping and the optimizer: rng fold_in(key(seed + 1), 0),
the loss sharded over the mesh. Process 0 writes loss and every gradient ('grads/PATH') to
OUT.npz.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from basic import gradcache
from basic import multihost
from basic import sharding
from basic import train
import config_helpers


def main(out_path, fields, coordinator=None, num_processes=None, process_id=None):
  t0 = time.perf_counter()
  if coordinator:
    multihost.initialize(coordinator, int(num_processes), int(process_id), peer_poll_s=0)
  config = config_helpers.tiny_config(fields)
  mesh = sharding.make_mesh(config.mesh)
  model, _, _, state, shardings = train.init_training(config, mesh)
  full = train.random_batch(config, config.batch_size, seed=0)
  rows = config.batch_size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  batch = sharding.global_batch({k: v[mine] for k, v in full.items()}, mesh)
  value_and_grad = gradcache.value_and_grad(
      train.make_encode_fn(model, mesh), train.make_loss_fn(config, mesh),
      num_microbatches=config.batch_size // config.microbatch_size,
      unroll=config.gradcache_unroll)
  step = jax.jit(lambda params, batch, rng: value_and_grad(
      params, batch, jax.random.fold_in(rng, 0)), in_shardings=(
          shardings.params, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
  loss, grads = step(state.params, batch, jax.random.key(config.seed + 1))
  # Replicated outputs: every process holds the whole value on its own devices.
  out = {'loss': np.asarray(loss.addressable_data(0))}
  for path, value in jax.tree_util.tree_flatten_with_path(grads)[0]:
    out[f'grads/{sharding.path_str(path)}'] = np.asarray(value.addressable_data(0))
  if jax.process_index() == 0:
    np.savez(out_path, **out)
  print(f'process {jax.process_index()} of {jax.process_count()}: {len(jax.devices())} devices, '
        f'loss {float(out["loss"]):.6f}, {time.perf_counter() - t0:.1f} s', flush=True)
  multihost.shutdown()   # Leaves together (a no-op with one process).


if __name__ == '__main__':
  main(sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:])
