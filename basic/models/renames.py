"""Parameter names of older versions, and the map that reads their checkpoints.

The Transformer MLP's layers (basic.models.transformer.MlpBlock) were flax's generated names
'Dense_0' / 'Dense_1' until they were named 'fc1' / 'fc2', so that sharding rules read as the
model does. A checkpoint written before holds `.../mlp/Dense_0/kernel` where the model now has
`.../mlp/fc1/kernel`: `basic.checkpoint.Checkpointer` restores it through this map (its
template `downgrade`d to the saved names, the restored tree `upgrade`d), and
`basic.config_defaults.fill` rewrites the same names in a saved config's sharding rules. The
map touches only a module named 'mlp' whose children are exactly the old names, so ConvNeXt's
'mlp_fc1' and CoAtNet's 'mlp_in' never match.
"""
import dataclasses
import re
from typing import Any, Mapping

import flax

# (parent module, old child name, new child name).
RENAMES = (('mlp', 'Dense_0', 'fc1'), ('mlp', 'Dense_1', 'fc2'))


def _rename_node(node: Mapping, pairs: dict):
  """A module's children dict with `pairs` (old -> new) renamed, if it has exactly those."""
  if set(node) == set(pairs):
    return {pairs[k]: v for k, v in node.items()}
  return node


def _map(tree, forward: bool):
  pairs = {}
  for parent, old, new in RENAMES:
    pairs.setdefault(parent, {}).update({old: new} if forward else {new: old})

  def walk(x, key=None):
    if isinstance(x, (dict, flax.core.FrozenDict)):
      out = {k: walk(v, k) for k, v in x.items()}
      if key in pairs:
        out = _rename_node(out, pairs[key])
      return type(x)(out) if isinstance(x, flax.core.FrozenDict) else out
    if isinstance(x, tuple) and hasattr(x, '_fields'):    # namedtuple (optax states).
      return type(x)(*(walk(v) for v in x))
    if isinstance(x, (list, tuple)):
      return type(x)(walk(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):   # flax.struct (TrainState).
      fields = {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x)
                if f.metadata.get('pytree_node', True)}
      return x.replace(**fields) if hasattr(x, 'replace') else dataclasses.replace(x, **fields)
    return x
  return walk(tree)


def upgrade(tree: Any):
  """A pytree (params, a train state, optimiser state) with the old names made current."""
  return _map(tree, forward=True)


def downgrade(tree: Any):
  """The inverse of `upgrade`: current names -> the old ones (a template for old checkpoints)."""
  return _map(tree, forward=False)


def is_old(tree: Any) -> bool:
  """Whether `tree` (e.g. a checkpoint's metadata tree) holds any old name."""
  olds = {parent: {old for p, old, _ in RENAMES if p == parent} for parent, _, _ in RENAMES}

  def walk(x, key=None):
    if isinstance(x, Mapping):
      if key in olds and set(x) == olds[key]:
        return True
      return any(walk(v, k) for k, v in x.items())
    if isinstance(x, (list, tuple)):
      return any(walk(v) for v in x)
    return False
  return walk(tree)


def upgrade_pattern(pattern: str) -> str:
  """A sharding-rule regex of an old config with the old names made current."""
  for parent, old, new in RENAMES:
    pattern = re.sub(rf'{parent}/{old}(?![0-9])', f'{parent}/{new}', pattern)
  return pattern


def upgrade_config(tree: dict) -> dict:
  """A plain config dict with old names in its sharding rules made current."""
  sharding = tree.get('sharding')
  if isinstance(sharding, dict) and isinstance(sharding.get('rules'), (list, tuple)):
    rules = [(upgrade_pattern(r[0]), r[1]) if isinstance(r, (list, tuple)) and len(r) == 2
             and isinstance(r[0], str) else r for r in sharding['rules']]
    tree = dict(tree, sharding=dict(sharding, rules=type(sharding['rules'])(rules)))
  return tree
