"""Device mesh and shardings.

One `jax.sharding.Mesh` with named axes from `config.mesh` (an ordered ConfigDict of axis sizes,
-1 = the remaining devices). The batch is sharded over the 'data' axis; parameters are
replicated unless partition rules say otherwise.
"""
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def mesh_shape(mesh_config, num_devices: int):
  """Resolves -1 in `config.mesh` -> ordered (axis names, sizes) multiplying to num_devices."""
  names = tuple(mesh_config.keys())
  sizes = [int(mesh_config[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh={dict(mesh_config)}: at most one axis may be -1.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise ValueError(f'config.mesh={dict(mesh_config)}: axis sizes do not divide the '
                     f'{num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'config.mesh={dict(mesh_config)}: uses {int(np.prod(sizes))} devices, '
                     f'but there are {num_devices}.')
  return names, tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the 'data' axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
