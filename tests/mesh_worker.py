"""Subprocess worker for tests/test_sharding.py: runs with 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py OUT_DIR [--all]

Trains 3 steps of a small config (K = 4 microbatches, the contrastive loss sharded over the mesh)
on 1 device and on several ('data', 'model') meshes (and with FSDP; `--all` adds the variants of
the slow test), records each variant's raw gradient-cached loss and gradients of the first batch
(before the optimizer), saves a checkpoint from the (4, 2) mesh and restores it onto (8, 1) and
one device, and writes everything the tests compare to OUT_DIR/results.npz.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from basic import checkpoint as checkpoint_lib
from basic import gradcache
from basic import optim
from basic import sharding
from basic import train
from basic.models import build as build_model
from configs import tiny

NUM_STEPS = 3
SHARDED_PARAM = ('image', 'encoder', 'block00', 'attn', 'query', 'kernel')   # [64, 4, 16]
MLP_PARAM = ('text', 'encoder', 'block00', 'mlp', 'fc1', 'kernel')       # [64, 128]


def small_config(data, model, fsdp=False):
  config = tiny.get_config()
  config.batch_size = 32
  config.microbatch_size = 8         # 4 microbatches: gradient caching is active.
  config.total_steps = 10
  config.optimizer.warmup_steps = 1
  config.model.embed_dim = 32
  for tower, depth in (('image', 1), ('text', 1)):
    config.model[tower].width = 64
    config.model[tower].num_heads = 4
    config.model[tower].mlp_dim = 128
    config.model[tower].depth = depth
  config.model.image.dropout = 0.1
  config.mesh.data = data
  config.mesh.model = model
  config.sharding.fsdp = fsdp
  config.sharding.fsdp_min_size = 1024
  return config


def batches(config):
  rng = np.random.default_rng(0)
  size, length = config.data.image_size, config.data.text_length
  for _ in range(NUM_STEPS):
    yield {'image': rng.integers(0, 256, (config.batch_size, size, size, 3), np.uint8),
           'text': rng.integers(1, config.model.text.vocab_size,
                                (config.batch_size, length)).astype(np.int32)}


def raw_gradients(config, model, mesh, state, shardings):
  """The gradient-cached (loss, grads) of the first batch at `state`, before the optimizer."""
  value_and_grad = gradcache.value_and_grad(
      train.make_encode_fn(model, mesh), train.make_loss_fn(config, mesh),
      num_microbatches=config.batch_size // config.microbatch_size)
  batch = sharding.global_batch(next(batches(config)), mesh)
  return jax.jit(value_and_grad, in_shardings=(
      shardings.params, sharding.batch_sharding(mesh), sharding.replicated(mesh)))(
          state.params, batch, jax.random.key(config.seed + 1))


def run(config, devices):
  """-> (state after NUM_STEPS, its shardings, losses, (loss, grads) of the first batch)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  state, shardings = train.create_train_state(config, model, tx, mesh)
  raw = raw_gradients(config, model, mesh, state, shardings)
  step = train.jit_train_step(config, model, tx, schedule, mesh, shardings)
  rng = jax.random.key(config.seed + 1)
  losses = []
  for batch in batches(config):
    state, metrics = step(state, sharding.global_batch(batch, mesh), rng)
    losses.append(float(metrics['train/loss']))
  return state, shardings, np.array(losses), raw


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def flat(tree):
  return {sharding.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(out_dir, run_all=False):
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  variants = {'single': ((1, 1, False), devices[:1]), 'mesh42': ((4, 2, False), devices),
              'mesh81': ((8, 1, False), devices), 'fsdp24': ((2, 4, True), devices)}
  if run_all:
    variants.update({'mesh24': ((2, 4, False), devices), 'fsdp42': ((4, 2, True), devices)})
  states = {}
  for name, ((data, model, fsdp), devs) in variants.items():
    config = small_config(data, model, fsdp)
    t0 = time.perf_counter()
    state, shardings, losses, (raw_loss, raw_grads) = run(config, devs)
    print(f'{name}: {time.perf_counter() - t0:.1f} s', flush=True)
    states[name] = (config, state, shardings)
    out[f'{name}/losses'] = losses
    out[f'{name}/raw/loss'] = np.asarray(raw_loss)
    for path, value in flat(raw_grads).items():
      out[f'{name}/raw/grads/{path}'] = value
    for key, path in (('query', SHARDED_PARAM), ('mlp', MLP_PARAM)):
      arr = _leaf(state.params, path)
      out[f'{name}/shard/{key}'] = np.array(arr.addressable_shards[0].data.shape)
    mu = _leaf(state.opt_state[1][0].mu, MLP_PARAM)
    out[f'{name}/shard/mlp_mu'] = np.array(mu.addressable_shards[0].data.shape)
    for path, value in flat(state.params).items():
      out[f'{name}/params/{path}'] = value
    for path, value in flat(state.opt_state).items():
      out[f'{name}/opt/{path}'] = value

  # Checkpoint written from the (4, 2) mesh, restored onto (8, 1) and onto one device.
  config, state, _ = states['mesh42']
  ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'ckpt'), max_to_keep=1)
  ckpt.save(NUM_STEPS, state, config)
  ckpt.wait()
  for name, (data, model, devs) in {'restore81': (8, 1, devices),
                                    'restore1': (1, 1, devices[:1])}.items():
    target = small_config(data, model)
    mesh = sharding.make_mesh(target.mesh, devs)
    m = build_model(target)
    tx, _ = optim.make_optimizer(target.optimizer, target.total_steps)
    abstract, shardings = train.abstract_train_state(target, m, tx, mesh)
    template = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    restored = ckpt.restore(template, NUM_STEPS)
    out[f'{name}/num_devices'] = np.array(
        len(_leaf(restored.params, SHARDED_PARAM).sharding.device_set))
    for path, value in flat(restored).items():
      out[f'{name}/state/{path}'] = value
  for path, value in flat(state).items():
    out[f'saved/state/{path}'] = value
  ckpt.close()
  np.savez(os.path.join(out_dir, 'results.npz'), **out)


if __name__ == '__main__':
  main(sys.argv[1], '--all' in sys.argv[2:])
