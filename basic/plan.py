r"""Plans a run on N devices without them: parameter counts, XLA's per-device memory, FLOPs.

  python -m basic.plan --config=configs/tiny.py --devices=8 [--config.batch_size=1024 ...]
  python -m basic.plan --config=configs/basic_l.py --topology=v5p:8x8x8     # needs `.[tpu]`

With --topology (a TPU topology name, 'v5p:8x8x8', 'v4:4x4x8', 'v3:8x16', 'v5e:16x16', ...)
the step is compiled ahead of time by the TPU compiler (libtpu, the `tpu` extra) for that
slice's devices, `jax.experimental.topologies.get_topology_desc(..., platform='tpu')`, on this
CPU-only machine, as MaxText's train_compile.py does: the compiler that will run the job
answers. v4 is planned as megacore (one device per chip, `chip_config_name='megacore'`, what a
v4 VM runs); v5p is megacore by default; v2 / v3 have one device per TensorCore. libtpu is set
up for that before JAX is imported (JAX_PLATFORMS=cpu for the host, TPU_WORKER_HOSTNAMES=
localhost, TPU_ACCELERATOR_TYPE, ALLOW_MULTIPLE_LIBTPU_LOAD=1: another process may hold
libtpu's lock file). A step that does not fit the chip's HBM fails to compile, with the
compiler's out-of-memory message.

Sets XLA_FLAGS for N fake CPU devices before JAX is imported, builds the abstract train state
with `jax.eval_shape` (no parameter is allocated), then lowers and compiles the real train step
with the real shardings (`config.mesh` over the N devices, `config.sharding` rules) from abstract
shapes, and prints:

  params/image_tower: <int>    image tower + image projection
  params/text_tower: <int>     text tower + text projection
  params/total: <int>          everything (towers, projections, temperature, bias)
  loss/devices, loss/chunk_size
                               the devices the contrastive loss is split over (1: every device
                               computes all of it) and c, its rows per logit block per device
                               (basic.train.loss_axes / loss_chunk_size; 0 = the unchunked loss)
  memory/arguments_gib, memory/outputs_gib, memory/temporaries_gib, memory/total_gib
                               XLA's per-device estimate (compiled.memory_analysis()); total =
                               arguments + outputs - aliased (donated) + temporaries.
  cost/flops_per_device, cost/bytes_per_device
                               FLOPs and HBM bytes accessed by one step on one device, from the
                               compiler's cost analysis with every while loop (gradient-cache
                               microbatches, loss chunks, scanned layers) counted trip-count
                               times (basic.flops.hlo_cost: loop bodies x trip counts).
  cost/model_flops_per_device  3 x forward FLOPs of both towers on N examples + the loss, from
                               compiled forwards (basic.flops.model_flops), / devices.
  hbm/capacity_gib, hbm/fits, hbm/headroom       (TPU topologies)
                               the device's HBM (chip table in basic.flops, cited there), whether
                               memory/total fits it, and 1 - total / capacity.
  roofline/step_s, roofline/mfu                  (TPU topologies)
                               max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth): a lower
                               bound of the step time, ignoring communication and latency; and
                               model FLOPs / (step_s x peak), so an UPPER bound of the MFU.

With --devices=N (no --topology) the estimate is the CPU compiler's; a TPU/GPU compiler schedules
differently, so treat it as a guide to how the shardings split the state and how big the
temporaries of one step are.
XLA:CPU does not realise the savings of rematerialisation (`config.model.*.remat`): its
scheduler computes the recomputed activations early, so the temporaries of a remat'd step are
about those of the same step without remat, an upper bound (BENCHMARKS.md, "ConvNeXt-XXLarge
plan"). Large models compile slowly here; XLA_FLAGS='--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true' speeds that up and leaves the estimate unchanged.
"""
import os
import sys

import numpy as np


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


def _topology_from_argv(argv):
  for i, arg in enumerate(argv):
    if arg.startswith('--topology='):
      return arg.split('=', 1)[1]
    if arg == '--topology' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


# TensorCores per chip, and the prefix of Cloud TPU accelerator-type names ('v5p-8', ...), which
# count TensorCores (v2-v5p) or chips (v5e, v6e).
_GENERATIONS = {'v2': (2, 'v2'), 'v3': (2, 'v3'), 'v4': (2, 'v4'), 'v5p': (2, 'v5p'),
                'v5': (2, 'v5p'), 'v5e': (1, 'v5litepod'), 'v6e': (1, 'v6e')}


def accelerator_type(topology: str) -> str:
  """'v5p:2x2x1' -> 'v5p-8' (libtpu's TPU_ACCELERATOR_TYPE of that slice)."""
  generation, _, shape = topology.partition(':')
  cores, prefix = _GENERATIONS.get(generation, (1, generation))
  chips = int(np.prod([int(d) for d in shape.split('x')])) if shape else 1
  return f'{prefix}-{chips * cores}'


def tpu_environment(topology: str):
  """Sets (setdefault) the environment libtpu reads when it loads, for compiling ahead of time
  for `topology` on a machine without TPUs. Before JAX is imported for JAX_PLATFORMS; before
  the first `get_topology_desc` for the rest."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type(topology))
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


if __name__ == '__main__':
  if _topology_from_argv(sys.argv):
    tpu_environment(_topology_from_argv(sys.argv))
  else:
    _fake_cpu_devices(_devices_from_argv(sys.argv))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax

from basic import config_lib
from basic import contrastive_sharded
from basic import flops as flops_lib
from basic import freeze
from basic import main as _main  # noqa: F401  # pylint: disable=unused-import  (defines --config)
from basic import models
from basic import optim
from basic import sharding
from basic import train
# pylint: enable=g-import-not-at-top,wrong-import-position

# --config (and its --config.* overrides) is the flag basic.main defines on import.
_DEVICES = flags.DEFINE_integer('devices', 1, 'Number of (fake CPU) devices to plan for.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', '', "A TPU topology to compile for with the TPU compiler (libtpu), e.g. "
    "'v5p:8x8x8', 'v4:4x4x8' (planned as megacore), 'v3:8x16'; overrides --devices.")

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


def tpu_devices(topology: str):
  """The devices of a TPU `topology` ('v5p:8x8x8'), for compiling without them (libtpu).

  v4 as megacore, one device per chip (what a v4 VM runs; the default would be one device per
  TensorCore), as MaxText's train_compile.py plans it.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  tpu_environment(topology)
  kwargs = {'chip_config_name': 'megacore'} if topology.split(':')[0] == 'v4' else {}
  return topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs).devices


def compile_step(config, devices):
  """-> (compiled train step, abstract train state, model, mesh): the real step with the real
  shardings (`config.mesh` over `devices`), lowered and compiled from abstract shapes."""
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.validate(config, num_data_devices=mesh.shape[sharding.DATA_AXIS])
  model = models.build(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps, freeze.rules(config))
  abstract, shardings = train.abstract_train_state(config, model, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       jax.eval_shape(lambda: train.init_batch(config, config.batch_size)))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(mesh))
  step = train.jit_train_step(config, model, tx, schedule, mesh, shardings)
  return step.lower(state, batch, rng).compile(), abstract, model, mesh


def plan(config, devices=None, *, costs: bool = False) -> dict:
  """Compiles the train step of `config` on `devices` (default all) from abstract shapes.

  `devices` may be a TPU topology's (`tpu_devices`): the step is then compiled by the TPU
  compiler. costs=True adds the 'cost/' and 'roofline/' entries (the command line prints
  them); it compiles the model's forwards too (cost/model_flops_per_device).

  Returns:
    {'params/...': int, 'memory/..._gib', 'cost/...': float per device, 'mesh': {axis: size},
     and with a known device (the chip table of basic.flops) 'hbm/...', 'roofline/...'}.
  """
  devices = jax.devices() if devices is None else devices
  compiled, abstract, model, mesh = compile_step(config, devices)
  mem = compiled.memory_analysis()
  out = param_counts(abstract.params)
  out['mesh'] = dict(mesh.shape)
  axes = train.loss_axes(config, mesh)   # The contrastive loss: devices it is split over, c.
  out['loss/devices'] = contrastive_sharded.num_shards(mesh, axes)
  out['loss/chunk_size'] = train.loss_chunk_size(config, mesh)
  total = None
  if mem is not None:
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temps, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    total = args + outs - alias + temps
    out.update({'memory/arguments_gib': args / _GIB, 'memory/outputs_gib': outs / _GIB,
                'memory/temporaries_gib': temps / _GIB, 'memory/total_gib': total / _GIB})
  spec = flops_lib.device_spec(devices)
  if spec is not None:
    out['device/chip'] = spec.chip
    if total is not None:
      out['hbm/capacity_gib'] = spec.hbm_bytes / _GIB
      out['hbm/fits'] = bool(total <= spec.hbm_bytes)
      out['hbm/headroom'] = 1.0 - total / spec.hbm_bytes
  if not costs:
    return out
  cost = flops_lib.hlo_cost(compiled)
  out['cost/flops_per_device'] = cost['flops']
  out['cost/bytes_per_device'] = cost['bytes accessed']
  if cost['unresolved_loops']:
    out['cost/unresolved_loops'] = len(cost['unresolved_loops'])
  out['cost/model_flops_per_device'] = (
      flops_lib.model_flops(config, abstract.params, encode_fn=train.make_encode_fn(model),
                            make_loss_fn=train.make_loss_fn, init_batch=train.init_batch)
      / len(devices))
  if spec is not None:
    step_s = flops_lib.roofline(cost['flops'], cost['bytes accessed'], spec)
    out['roofline/step_s'] = step_s
    out['roofline/mfu'] = out['cost/model_flops_per_device'] / (step_s * spec.peak_flops)
  return out


def format_plan(result: dict) -> list:
  """`plan`'s result -> the printed 'key: value' lines (ints as ints, bools as true/false,
  FLOPs and bytes in %.4e, the rest %.4f), after a 'mesh: ...' line."""
  result = dict(result)
  lines = [f"mesh: {result.pop('mesh')}"]
  for key, value in result.items():
    if isinstance(value, bool):
      value = str(value).lower()
    elif isinstance(value, int) or isinstance(value, str):
      pass
    elif key.startswith('cost/'):
      value = f'{value:.4e}'
    elif key == 'roofline/step_s':
      value = f'{value:.4e}'
    else:
      value = f'{value:.4f}'
    lines.append(f'{key}: {value}')
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/tiny.py.')
  if _TOPOLOGY.value:
    devices = tpu_devices(_TOPOLOGY.value)
    where = f'{len(devices)} devices of {_TOPOLOGY.value} ({devices[0].device_kind})'
  else:
    if jax.device_count() < _DEVICES.value:
      raise app.UsageError(f'--devices={_DEVICES.value}, but JAX has {jax.device_count()} '
                           'devices (JAX was imported before XLA_FLAGS could be set).')
    devices = jax.devices()[:_DEVICES.value]
    where = f'{len(devices)} devices'
  lines = format_plan(plan(config, devices, costs=True))
  print(f'{lines[0]} on {where}')
  print('\n'.join(lines[1:]))


if __name__ == '__main__':
  app.run(main)
