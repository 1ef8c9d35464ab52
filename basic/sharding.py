"""Device mesh and shardings.

One `jax.sharding.Mesh` with named axes from `config.mesh` (an ordered ConfigDict of axis sizes,
-1 = the remaining devices). The batch is sharded over the 'data' axis; parameters are
replicated unless the partition rules of `config.sharding` say otherwise (see
`param_partition_specs`), and optimiser-state leaves follow their parameters.
"""
import re
from typing import Optional

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def constrain_batch(x: jax.Array) -> jax.Array:
  """Shards x's leading (batch) axis over the 'data' axis of the mesh in context, if any.

  Models call this on activations whose sharding XLA would otherwise take from a parameter:
  the token-embedding gather inherits the FSDP-sharded table's layout, which leaves the batch
  replicated and every device running the whole microbatch through the text tower. Outside a
  mesh context (`jax.sharding.use_abstract_mesh`, set by `basic.train.make_encode_fn`), or
  when the batch does not divide over the data axis, x is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return x
  if x.shape[0] % mesh.shape[DATA_AXIS]:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


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


def put_whole(tree, shardings):
  """Arrays whose whole value every process holds (e.g. a checkpoint's parameters restored on
  each host, `Checkpointer.restore_params`) -> global jax.Arrays with `shardings` (a matching
  tree): each process fills its own devices' shards from its copy. Unlike `jax.device_put`,
  this needs no cross-host transfer."""
  def put(x, sharding):
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree, shardings)


# ---------------------------------------------------------------------------------------------
# Parameter and optimiser-state shardings from `config.sharding`.
#
# `config.sharding.rules` is an ordered tuple of (regex, spec) pairs. The regex is `re.search`ed
# on the '/'-joined parameter path (e.g. 'image/encoder/block00/attn/query/kernel'); the first
# rule that matches gives the parameter's PartitionSpec; unmatched parameters are replicated.
# A spec is a tuple with one entry per parameter dimension: None (replicated), a mesh-axis name,
# or a tuple of mesh-axis names. With `config.sharding.fsdp`, parameters with at least
# `config.sharding.fsdp_min_size` elements are additionally sharded over 'data' on their largest
# still-unsharded dimension that the data axis size divides (ZeRO-3 / FSDP).

_RULES_FIELD = 'config.sharding.rules'

# Stacked (layer-scanned) parameters: a module whose name ends with SCAN_SUFFIX holds the
# parameters of `n` identical blocks stacked on a new leading axis (`basic.models.scan`, e.g.
# 'image/encoder/block_scan/attn/query/kernel' [depth, D, heads, D/heads] for the unscanned
# 'image/encoder/block00/...' .. 'block{depth-1}/...'). Rules are written for one block: a rule
# spec with one entry per dimension of a block's parameter gets a leading None per stacked axis
# (the layer axis is never sharded, so a scan step slices it locally), and FSDP counts a block's
# elements and never picks a stacked axis. A stacked parameter is thus sharded exactly as each of
# its unscanned blocks.
SCAN_SUFFIX = '_scan'


def stacked_dims(path: str) -> int:
  """The number of leading stacked (layer) axes of the parameter at '/'-joined `path`."""
  return sum(part.endswith(SCAN_SUFFIX) for part in path.split('/'))


def path_str(path) -> str:
  """A jax tree key path -> 'a/b/c' (dict keys, attribute names and sequence indices)."""
  return '/'.join(_key_str(k) for k in path)


def _key_str(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flatten(tree):
  """-> ([(path string, leaf)], treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), x) for p, x in leaves], treedef


def _axis_names(entry):
  """A spec entry (None | name | tuple of names) -> tuple of mesh-axis names."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _check_rule(path, shape, pattern, spec, mesh, stacked=0):
  """Raises ValueError naming path and rule if `spec` cannot shard an array of `shape`.

  `spec` is the rule's spec with the leading Nones of `stacked` layer axes already added.
  """
  where = f'parameter {path!r} of shape {tuple(shape)} matches rule ({pattern!r}, {spec!r}) ' \
          f'in {_RULES_FIELD}'
  if not isinstance(spec, (tuple, list)):
    raise ValueError(f'{where}: the spec must be a tuple with one entry per dimension.')
  if len(spec) != len(shape):
    per_block = (f' ({stacked} stacked layer axis(es) first, then one entry per dimension of a '
                 f'block\'s parameter)' if stacked else '')
    raise ValueError(f'{where}: the spec has {len(spec) - stacked} entries but the parameter '
                     f'has {len(shape) - stacked} dimensions{per_block}.')
  used = [a for entry in spec for a in _axis_names(entry)]
  if len(used) != len(set(used)):
    raise ValueError(f'{where}: a mesh axis is used more than once.')
  if mesh is None:
    return
  for axis in used:
    if axis not in mesh.shape:
      raise ValueError(f'{where}: unknown mesh axis {axis!r}; the mesh axes are '
                       f'{tuple(mesh.axis_names)} (config.mesh).')
  for dim, (size, entry) in enumerate(zip(shape, spec)):
    parts = int(np.prod([mesh.shape[a] for a in _axis_names(entry)]))
    if size % parts:
      raise ValueError(f'{where}: dimension {dim} (size {size}) is not divisible by the '
                       f'{parts} devices of mesh axes {_axis_names(entry)}.')


def _compile_rules(rules):
  compiled = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f'{_RULES_FIELD}: each rule must be a (regex, spec) pair, got {rule!r}.')
    pattern, spec = rule
    try:
      compiled.append((re.compile(pattern), pattern, spec))
    except re.error as e:
      raise ValueError(f'{_RULES_FIELD}: bad regex {pattern!r}: {e}.') from e
  return compiled


def _match(path, compiled):
  for regex, pattern, spec in compiled:
    if regex.search(path):
      return pattern, spec
  return None


def _fsdp_spec(spec, shape, data_size, stacked=0):
  """Adds DATA_AXIS on the largest unsharded dimension divisible by data_size (if any), never
  on the first `stacked` (layer) axes."""
  spec = list(spec) if spec is not None else [None] * len(shape)
  if data_size <= 1 or any(DATA_AXIS in _axis_names(e) for e in spec):
    return tuple(spec)
  candidates = [d for d in range(stacked, len(shape))
                if spec[d] is None and shape[d] % data_size == 0]
  if candidates:
    best = max(candidates, key=lambda d: (shape[d], -d))  # Largest; first on ties.
    spec[best] = DATA_AXIS
  return tuple(spec)


def param_partition_specs(params, rules, mesh: Optional[Mesh] = None, *, fsdp: bool = False,
                          fsdp_min_size: int = 2**18):
  """PartitionSpecs for a parameter pytree from ordered (regex, spec) rules.

  Args:
    params: pytree of arrays or jax.ShapeDtypeStructs (anything with `.shape`).
    rules: ordered (regex, spec) pairs (`config.sharding.rules`); the first rule whose regex
      `re.search`es the '/'-joined parameter path wins; unmatched parameters are replicated.
    mesh: if given, mesh-axis names and divisibility are checked against it (required for
      fsdp, which needs the 'data' axis size).
    fsdp: additionally shard parameters with >= fsdp_min_size elements over 'data' on their
      largest still-unsharded dimension divisible by the data axis size.
    fsdp_min_size: element count from which FSDP applies.
  Stacked parameters (a path component ending with SCAN_SUFFIX, see `stacked_dims`) take the
  spec of one block with a leading None per stacked axis; FSDP counts one block's elements.

  Returns:
    A pytree like `params` of `PartitionSpec`s.

  Raises:
    ValueError: naming the parameter path and the rule, for a spec of the wrong rank, an unknown
      mesh axis, or a dimension the mesh axes do not divide.
  """
  if fsdp and mesh is None:
    raise ValueError('config.sharding.fsdp=True needs the mesh (its data axis size).')
  compiled = _compile_rules(rules)
  data_size = mesh.shape.get(DATA_AXIS, 1) if mesh is not None else 1
  leaves, treedef = _flatten(params)
  specs = []
  for path, x in leaves:
    shape = tuple(x.shape)
    stacked = stacked_dims(path)
    spec = None
    matched = _match(path, compiled)
    if matched is not None:
      pattern, spec = matched
      if stacked and isinstance(spec, (tuple, list)):
        spec = (None,) * stacked + tuple(spec)
      _check_rule(path, shape, pattern, spec, mesh, stacked)
      spec = tuple(spec)
    if fsdp and int(np.prod(shape[stacked:])) >= fsdp_min_size:
      spec = _fsdp_spec(spec, shape, data_size, stacked)
    specs.append(P(*spec) if spec is not None else P())
  return jax.tree_util.tree_unflatten(treedef, specs)


def unmatched_params(params, rules, min_size: int) -> list:
  """Paths ('a/b/c') of parameters with >= min_size elements (per block, for stacked ones)
  that no rule matches."""
  compiled = _compile_rules(rules)
  leaves, _ = _flatten(params)
  return [path for path, x in leaves
          if int(np.prod(x.shape[stacked_dims(path):])) >= min_size
          and _match(path, compiled) is None]


def tree_partition_specs(tree, params, param_specs):
  """Specs for any pytree (train state, optimiser state) that holds parameter-shaped leaves.

  A leaf whose key path ends with a parameter's path (the longest such suffix) and has that
  parameter's shape gets the parameter's spec (e.g. `params/...`, Adam's `mu/...`, `nu/...`);
  every other leaf (step counters, scalars, factored statistics) is replicated.
  """
  by_path = {}
  for (path, x), spec in zip(_flatten(params)[0], jax.tree.leaves(
      param_specs, is_leaf=lambda s: isinstance(s, P))):
    by_path[path] = (tuple(x.shape), spec)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  specs = []
  for keys, x in leaves:
    names = [_key_str(k) for k in keys]
    spec = P()
    for start in range(len(names)):
      hit = by_path.get('/'.join(names[start:]))
      if hit is not None and hit[0] == tuple(x.shape):
        spec = hit[1]
        break
    specs.append(spec)
  return jax.tree_util.tree_unflatten(treedef, specs)


def sharding_config_specs(params, mesh: Mesh, sharding_config):
  """`param_partition_specs` with the fields of `config.sharding` (None = no rules)."""
  if sharding_config is None:
    return param_partition_specs(params, (), mesh)
  return param_partition_specs(
      params, tuple(sharding_config.rules), mesh, fsdp=bool(sharding_config.fsdp),
      fsdp_min_size=int(sharding_config.fsdp_min_size))


def param_shardings(params, mesh: Mesh, sharding_config):
  """NamedShardings of `params` per `config.sharding` (a tree like `params`)."""
  specs = sharding_config_specs(params, mesh, sharding_config)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def state_shardings(abstract_state, mesh: Mesh, config):
  """NamedShardings for a train state with `.params` (and e.g. `.opt_state`, `.step`).

  Parameters follow `config.sharding`; optimiser-state leaves that mirror a parameter follow
  that parameter; everything else is replicated.
  """
  param_specs = sharding_config_specs(abstract_state.params, mesh, config.sharding)
  specs = tree_partition_specs(abstract_state, abstract_state.params, param_specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))
