"""Frozen parameters, locked towers, layer-wise learning-rate decay and lr multipliers.

Every function here reads parameter paths and shapes only (never values), so it works on
parameters, abstract parameters (ShapeDtypeStructs) and any tree of their structure.

Paths are '/'-joined (`basic.sharding.path_str`): 'image/encoder/block03/attn/query/kernel',
'image_proj/kernel', 'log_temperature'. A tower `side` ('image' | 'text') is its parameters
under 'side/' plus its projection to the joint embedding, 'side_proj/...'.

Layers (for layer_decay and `lock_*_unlocked_blocks`), per tower, as BEiT and OpenCLIP count
them: L = the tower's number of blocks. Blocks are the path components 'blockNN' (ViT, text) and
'stageS_blockNN' (CoAtNet, ConvNeXt), flattened in the order (stage, block): block b of that
order (0-based) is layer b + 1. A scanned group ('block_scan', 'stageS_block_scan': a leading
axis of n layers, `basic.models.scan`) holds n consecutive layers, after the unscanned blocks of
its stage; its leaves get one layer per slice. Layer 0: the parameters before the first block,
the tower's first path component matching `EMBEDDING` (patch / token / position embeddings,
class token, ln_pre, stems). A stage's downsampling ('stageS_downsample_*') takes the layer of
the stage's first block. Everything else in the tower (final norm, pooling heads) and the
projection: layer L + 1. Parameters outside the towers (log_temperature, a sigmoid bias): no
layer, lr scale 1.

lr scale of a parameter at layer i of a tower of L blocks: layer_decay^(L + 1 - i) (the
projection: 1), times the multiplier of the first `lr_mults` regex that fully matches its path
(1 if none). A scanned leaf's scale is a vector [n], one per slice.

Frozen: a leaf whose path fully matches a regex of `config.optimizer.frozen`, or a leaf of a
locked tower (`config.lock_image` / `lock_text`) at a layer <= L - u, u = the tower's
`lock_*_unlocked_blocks` (u = 0: the whole tower, projection included; u > 0: the last u blocks,
the final norm / heads and the projection stay trainable). A scanned leaf may be frozen in some
slices only: its mask is then a bool vector [n], per slice.
"""
import dataclasses
import re
from typing import Optional

import jax
import numpy as np

from basic import sharding

SIDES = ('image', 'text')
# A tower's parameters before its first block (layer 0), by the first path component in it.
EMBEDDING = re.compile(r'^(stem.*|embedding|pos_embedding|cls|ln_pre|token_embedding)$')
_BLOCK = re.compile(r'^(?:stage(\d+)_)?block(\d+|_scan)$')
_DOWNSAMPLE = re.compile(r'^stage(\d+)_downsample')


@dataclasses.dataclass(frozen=True)
class Rules:
  """What is frozen and each parameter's lr scale (see the module docstring).

  frozen: regexes over paths (config.optimizer.frozen); unlocked: {side: u} for each locked
  tower (config.lock_*; u = config.lock_*_unlocked_blocks); layer_decay in (0, 1]; lr_mults:
  ((regex, multiplier), ...).
  """
  frozen: tuple = ()
  unlocked: tuple = ()   # ((side, u), ...)
  layer_decay: float = 1.0
  lr_mults: tuple = ()

  @property
  def active(self) -> bool:
    return bool(self.frozen or self.unlocked or self.layer_decay != 1.0 or self.lr_mults)


def rules(config) -> Rules:
  """The Rules of an experiment config (config.lock_* and config.optimizer's fields)."""
  unlocked = tuple((side, int(config[f'lock_{side}_unlocked_blocks']))
                   for side in SIDES if config[f'lock_{side}'])
  return optimizer_rules(config.optimizer, unlocked)


def optimizer_rules(opt_config, unlocked=()) -> Rules:
  """The Rules of `config.optimizer` alone (no locked towers unless `unlocked` says so)."""
  return Rules(frozen=tuple(opt_config.frozen), unlocked=tuple(unlocked),
               layer_decay=float(opt_config.layer_decay),
               lr_mults=tuple((str(r), float(m)) for r, m in opt_config.lr_mults))


def _side(path: str) -> Optional[str]:
  head = path.split('/', 1)[0]
  for side in SIDES:
    if head in (side, f'{side}_proj'):
      return side
  return None


def _layers(named) -> dict:
  """{path: (side, layer (int or int array [n]), L)} for the tower leaves of [(path, shape)]."""
  groups = {side: {} for side in SIDES}   # side -> {(stage, index): layers}
  for path, shape in named:
    side = _side(path)
    if side is None or not path.startswith(side + '/'):
      continue
    for part in path.split('/')[1:]:
      match = _BLOCK.match(part)
      if match:
        stage = int(match.group(1) or 0)
        scanned = match.group(2) == '_scan'
        if sharding.stacked_dims(path) > 1:
          raise ValueError(f'{path}: more than one stacked layer axis; layer ids are not defined.')
        key = (stage, float('inf') if scanned else int(match.group(2)))
        groups[side][key] = shape[0] if scanned else 1
        break
  first, depth = {}, {}
  for side, group in groups.items():
    offset = 1
    for key in sorted(group):
      first[side, key] = offset
      first.setdefault((side, 'stage', key[0]), offset)
      offset += group[key]
    depth[side] = offset - 1
  out = {}
  for path, shape in named:
    side = _side(path)
    if side is None:
      continue
    total = depth[side]
    parts = path.split('/')
    layer = total + 1
    if parts[0] == side and len(parts) > 1:
      for part in parts[1:]:
        match = _BLOCK.match(part)
        if match:
          stage = int(match.group(1) or 0)
          scanned = match.group(2) == '_scan'
          start = first[side, (stage, float('inf') if scanned else int(match.group(2)))]
          layer = start + np.arange(shape[0]) if scanned else start
          break
      else:
        down = _DOWNSAMPLE.match(parts[1])
        if EMBEDDING.match(parts[1]):
          layer = 0
        elif down and (side, 'stage', int(down.group(1))) in first:
          layer = first[side, 'stage', int(down.group(1))]
    out[path] = (side, layer, total)
  return out


def _named(params):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [(sharding.path_str(p), tuple(np.shape(x))) for p, x in leaves], treedef


def tower_depths(params) -> dict:
  """{side: L}, the number of blocks of each tower (scanned groups counted per layer)."""
  named, _ = _named(params)
  depths = {side: 0 for side in SIDES}
  for side, _, total in _layers(named).values():
    depths[side] = total
  return depths


def layer_ids(params):
  """A tree like `params`: each tower leaf's layer (an int, or an int array [n] for a scanned
  leaf), -1 outside the towers."""
  named, treedef = _named(params)
  layers = _layers(named)
  return jax.tree_util.tree_unflatten(
      treedef, [layers[p][1] if p in layers else -1 for p, _ in named])


def trainable(params, r: Rules):
  """A tree like `params`: True (trained), False (frozen) or a bool array [n] (a scanned leaf
  frozen in some slices: True where trained). Raises ValueError naming
  config.lock_*_unlocked_blocks when it exceeds the tower's depth."""
  named, treedef = _named(params)
  layers = _layers(named)
  depths = tower_depths(params)
  unlocked = dict(r.unlocked)
  for side, u in unlocked.items():
    if u > depths[side]:
      raise ValueError(f'config.lock_{side}_unlocked_blocks={u}: the {side} tower has '
                       f'{depths[side]} blocks.')
  out = []
  for path, _ in named:
    if any(re.fullmatch(p, path) for p in r.frozen):
      out.append(False)
      continue
    side, layer, total = layers.get(path, (None, None, None))
    if side in unlocked:
      u = unlocked[side]
      keep = np.asarray(layer) > total - u if u else np.zeros(np.shape(layer), bool)
      out.append(bool(keep) if keep.ndim == 0 else (bool(keep.all()) if keep.all() or
                                                     not keep.any() else keep))
    else:
      out.append(True)
  return jax.tree_util.tree_unflatten(treedef, out)


def lr_scales(params, r: Rules):
  """A tree like `params`: each leaf's lr scale (a float, or a float32 array [n] per slice)."""
  named, treedef = _named(params)
  layers = _layers(named)
  out = []
  for path, _ in named:
    scale = 1.0
    if path in layers and r.layer_decay != 1.0:
      _, layer, total = layers[path]
      scale = np.float32(r.layer_decay) ** (total + 1 - np.asarray(layer, np.float32))
      scale = float(scale) if np.ndim(scale) == 0 else scale.astype(np.float32)
    mult = next((m for pattern, m in r.lr_mults if re.fullmatch(pattern, path)), 1.0)
    out.append(scale * mult if np.ndim(scale) else float(scale * mult))
  return jax.tree_util.tree_unflatten(treedef, out)


def locked_towers(params, r: Rules) -> tuple:
  """The sides ('image', 'text') whose every parameter (projection included) is frozen whole:
  their embeddings are constants of the trained parameters."""
  named, _ = _named(params)
  flags = dict(zip((p for p, _ in named), jax.tree.leaves(
      trainable(params, r), is_leaf=lambda x: isinstance(x, np.ndarray))))
  out = []
  for side in SIDES:
    mine = [f for p, f in flags.items() if _side(p) == side]
    if mine and all(f is False for f in mine):
      out.append(side)
  return tuple(out)


def frozen_leaves(mask):
  """A trainable() tree -> a tree of bools, True where the whole leaf is frozen."""
  return jax.tree.map(lambda m: m is False, mask, is_leaf=lambda x: isinstance(x, np.ndarray))


def per_slice(value, leaf):
  """A per-leaf value (a scalar, or an array [n] over a scanned leaf's layers) shaped to
  broadcast against `leaf` ([n, 1, ...])."""
  value = np.asarray(value)
  return value.reshape(value.shape + (1,) * (np.ndim(leaf) - value.ndim))


def select(mask, new, old):
  """Per leaf: `new` where trained, `old` where frozen (whole leaves or slices); `old` itself
  for a frozen leaf, so its bits never change."""
  def pick(m, n, o):
    if m is True:
      return n
    if m is False:
      return o
    return jax.numpy.where(per_slice(m, n), n, o)
  return jax.tree.map(pick, mask, new, old, is_leaf=lambda x: isinstance(x, np.ndarray))


def label_tree(mask):
  """optax.multi_transform labels: 'frozen' for whole frozen leaves, 'trained' otherwise."""
  return jax.tree.map(lambda m: 'frozen' if m is False else 'trained', mask,
                      is_leaf=lambda x: isinstance(x, np.ndarray))

