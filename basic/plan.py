r"""Plans a run on N devices without them: parameter counts and XLA's per-device memory.

  python -m basic.plan --config=configs/tiny.py --devices=8 [--config.batch_size=1024 ...]

Sets XLA_FLAGS for N fake CPU devices before JAX is imported, builds the abstract train state
with `jax.eval_shape` (no parameter is allocated), then lowers and compiles the real train step
with the real shardings (`config.mesh` over the N devices, `config.sharding` rules) from abstract
shapes, and prints:

  params/image_tower: <int>    image tower + image projection
  params/text_tower: <int>     text tower + text projection
  params/total: <int>          everything (towers, projections, temperature, bias)
  memory/arguments_gib, memory/outputs_gib, memory/temporaries_gib, memory/total_gib
                               XLA's per-device estimate (compiled.memory_analysis()); total =
                               arguments + outputs - aliased (donated) + temporaries.

The estimate is the CPU compiler's; a TPU/GPU compiler schedules differently, so treat it as a
guide to how the shardings split the state and how big the temporaries of one step are.
XLA:CPU does not realise the savings of rematerialisation (`config.model.*.remat`): its
scheduler computes the recomputed activations early, so the temporaries of a remat'd step are
about those of the same step without remat, an upper bound (BENCHMARKS.md, "ConvNeXt-XXLarge
plan"). Large models compile slowly here; XLA_FLAGS='--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true' speeds that up and leaves the estimate unchanged.
"""
import os
import sys


def _devices_from_argv(argv) -> int:
  for i, arg in enumerate(argv):
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
    if arg == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return 1


def _fake_cpu_devices(num_devices: int):
  """N fake CPU devices; must run before JAX is imported (XLA reads the flags once)."""
  if 'jax' in sys.modules:
    return
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={num_devices}')
  os.environ['XLA_FLAGS'] = ' '.join(flags)
  os.environ['JAX_PLATFORMS'] = 'cpu'


if __name__ == '__main__':
  _fake_cpu_devices(_devices_from_argv(sys.argv))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from basic import config_lib
from basic import optim
from basic import sharding
from basic import train
from basic.models import DualEncoder
# pylint: enable=g-import-not-at-top,wrong-import-position

# --config (and its --config.* overrides) is the flag basic.train defines on import.
_DEVICES = flags.DEFINE_integer('devices', 1, 'Number of (fake CPU) devices to plan for.')

_GIB = 2**30


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(params) -> dict:
  """{'params/image_tower', 'params/text_tower', 'params/total'} -> integer counts."""
  return {
      'params/image_tower': _count(params.get('image', {})) + _count(params.get('image_proj', {})),
      'params/text_tower': _count(params.get('text', {})) + _count(params.get('text_proj', {})),
      'params/total': _count(params),
  }


def plan(config, devices=None) -> dict:
  """Compiles the train step of `config` on `devices` (default all) from abstract shapes.

  Returns:
    {'params/...': int, 'memory/..._gib': float per device, 'mesh': {axis: size}}.
  """
  devices = jax.devices() if devices is None else devices
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.validate(config, num_data_devices=mesh.shape[sharding.DATA_AXIS])
  model = DualEncoder(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract, shardings = train.abstract_train_state(config, model, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       jax.eval_shape(lambda: train.init_batch(config, config.batch_size)))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(mesh))
  step = train.jit_train_step(config, model, tx, schedule, mesh, shardings)
  compiled = step.lower(state, batch, rng).compile()
  mem = compiled.memory_analysis()
  out = param_counts(abstract.params)
  out['mesh'] = dict(mesh.shape)
  if mem is not None:
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temps, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    out.update({'memory/arguments_gib': args / _GIB, 'memory/outputs_gib': outs / _GIB,
                'memory/temporaries_gib': temps / _GIB,
                'memory/total_gib': (args + outs - alias + temps) / _GIB})
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/tiny.py.')
  if jax.device_count() < _DEVICES.value:
    raise app.UsageError(f'--devices={_DEVICES.value}, but JAX has {jax.device_count()} devices '
                         '(JAX was imported before XLA_FLAGS could be set).')
  result = plan(config, jax.devices()[:_DEVICES.value])
  print(f"mesh: {result.pop('mesh')} on {_DEVICES.value} devices")
  for key, value in result.items():
    print(f'{key}: {value}' if isinstance(value, int) else f'{key}: {value:.4f}')


if __name__ == '__main__':
  app.run(main)
