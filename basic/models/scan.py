"""Layer scanning: identical blocks as one `flax.linen.scan` over stacked parameters.

A tower with `scan_layers=True` (`config.model.image.scan_layers`, `config.model.text.scan_layers`)
runs each group of identical blocks as one scanned block (MaxText / big_vision `scan_layers`):
the compiled program holds one copy of the block, so compile time and compiler memory do not grow
with depth. Groups: every block of a Transformer `Encoder` (ViT and text towers); in a ConvNeXt
or CoAtNet stage, the blocks after the stage's first one (which stays unscanned: in CoAtNet it
downsamples and changes width; ConvNeXt keeps the same split so both read alike).

Parameter layout. Unscanned, block i of a group is a module `{prefix}{i:02d}` ('block03',
'stage2_block07'); scanned, the group is one module `{prefix}_scan` whose every parameter has a
leading layer axis: `block_scan/attn/query/kernel` [depth, D, heads, D/heads] stacks
`block00/attn/query/kernel` .. `block{depth-1}/...`; in CoAtNet `stage3_block_scan` stacks
`stage3_block01` .. (`stage3_block00` stays). `unstack` and `to_layout` convert between the two
(exactly: a stack and its slices); `basic.sharding.stacked_dims` tells a stacked parameter by its
path (a component ending with `basic.sharding.SCAN_SUFFIX`).

Numerics. The scanned tower equals the unscanned one with the same (converted) parameters: the
same block function per layer, and the same per-layer random numbers. Blocks do not draw their
dropout / drop-path rng from their module path (which differs between layouts); the tower draws
one key from the 'dropout' stream and block number l (counted over the whole tower) gets
`jax.random.fold_in(key, l)` in both layouts (`layer_rngs`); per-layer drop-path rates are scan
inputs. Parameter init differs (a split key per layer instead of a key per module name), which
only matters for fresh models. Remat composes as in big_vision: `nn.remat` (policy of
`config.model.*.remat`) inside `nn.scan`, so the backward pass recomputes one layer at a time.
"""
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from basic import sharding

SCAN_SUFFIX = sharding.SCAN_SUFFIX
_NUMBERED = re.compile(r'^(.*?)(\d+)$')


def block_name(prefix: str, index: int) -> str:
  """Name of unscanned block `index` of a group: 'block03'."""
  return f'{prefix}{index:02d}'


def scan_name(prefix: str) -> str:
  """Name of the scanned module of a group: 'block_scan'."""
  return f'{prefix}{SCAN_SUFFIX}'


def layer_rng(rng, index: int):
  """The rng of block `index` (counted over the tower): fold_in(rng, index); None stays None."""
  return None if rng is None else jax.random.fold_in(rng, index)


def layer_rngs(rng, start: int, length: int):
  """[length] keys of blocks start..start+length-1, each equal to `layer_rng(rng, l)`."""
  if rng is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(start, start + length))


def fold(rng, index: int):
  """Key `index` of a block's several random draws (e.g. its dropout layers); None stays None."""
  return None if rng is None else jax.random.fold_in(rng, index)


def scan_blocks(block: nn.Module, x, xs: Any, length: int,
                apply: Callable[[nn.Module, Any, Any], Any]):
  """Runs `length` layers of one block module over stacked parameters.

  Equals `for l in range(length): x = apply(block_l, x, xs[l])`, where block_l is `block` with
  the l-th slice of every parameter and xs[l] the l-th slice (leading axis) of every leaf of `xs`
  (per-layer inputs: rngs, drop-path rates; None leaves allowed). `block` is an unbound module
  instance named `scan_name(prefix)`; its parameters get a leading [length] axis
  (`variable_axes={'params': 0}`), a 'params' and 'dropout' key split per layer at init
  (`split_rngs`; the blocks here take their dropout keys from `xs`). Arguments the same for every
  layer (attention mask, the deterministic flag) are closed over by `apply`.
  """
  def body(module, carry, layer_xs):
    # The batch sharding of the carry, stated inside the loop: XLA's SPMD partitioner does not
    # carry it into a while body by itself and would run every layer on the whole (replicated)
    # microbatch on every device (BASIC-L's plan: 810 GiB per device instead of 58).
    carry = sharding.constrain_batch(carry)
    return sharding.constrain_batch(apply(module, carry, layer_xs)), None

  scanned = nn.scan(body, variable_axes={'params': 0},
                    split_rngs={'params': True, 'dropout': True}, length=length)
  x, _ = scanned(block, x, xs)
  return x


# --- Parameter layouts. ---------------------------------------------------------------------


def _is_node(x) -> bool:
  return isinstance(x, Mapping)


def _slice(tree, index: int):
  return jax.tree.map(lambda a: a[index], tree)


def _stack(trees):
  def stack(*leaves):
    if all(isinstance(a, np.ndarray) for a in leaves):
      return np.stack(leaves)
    return jnp.stack(leaves)
  return jax.tree.map(stack, *trees)


def _group(node: Mapping, prefix: str) -> list[int]:
  """Indices i of the modules named `{prefix}{i}` in `node`, sorted."""
  out = []
  for name in node:
    m = _NUMBERED.match(name)
    if m and m.group(1) == prefix and _is_node(node[name]):
      out.append(int(m.group(2)))
  return sorted(out)


def _one_layer(tree):
  """Abstract shapes of one layer of a stacked tree (the leading axis dropped)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), tree)


def unstack(params):
  """Any layout -> the unscanned one: each `{prefix}_scan` module (leading axis n) becomes
  `{prefix}{k:02d}` .. `{prefix}{k+n-1:02d}`, k = the number of unscanned `{prefix}NN` blocks
  beside it (0, or 1 for a stage's first block). Leaves are sliced, not copied."""
  if not _is_node(params):
    return params
  out = {}
  for name, value in params.items():
    if name.endswith(SCAN_SUFFIX) and _is_node(value):
      prefix = name[:-len(SCAN_SUFFIX)]
      start = len(_group(params, prefix))
      leaves = jax.tree.leaves(value)
      length = int(np.shape(leaves[0])[0]) if leaves else 0
      for l in range(length):
        out[block_name(prefix, start + l)] = unstack(_slice(value, l))
    else:
      out[name] = unstack(value)
  return out


def to_layout(params, like):
  """`params` (any layout) in the layout of `like` (a params tree or its abstract shapes, e.g.
  `jax.eval_shape` of the target model's init): every `{prefix}_scan` module of `like` gets the
  unscanned blocks `{prefix}NN` of `params` that `like` does not have itself, stacked in index
  order; everything else is carried over by name. Exact (stacks and slices only).

  Raises ValueError naming the module if the number of blocks does not fit.
  """
  return _to_layout(unstack(params), like, '')


def _to_layout(params, like, where):
  if not _is_node(like):
    return params
  if not _is_node(params):
    raise ValueError(f'to_layout: {where or "the root"} is a leaf in params but a module in the '
                     'target layout.')
  out = {}
  for name, target in like.items():
    path = f'{where}/{name}' if where else name
    if name.endswith(SCAN_SUFFIX) and _is_node(target):
      prefix = name[:-len(SCAN_SUFFIX)]
      indices = [i for i in _group(params, prefix)
                 if block_name(prefix, i) not in like]
      leaves = jax.tree.leaves(target)
      length = int(np.shape(leaves[0])[0]) if leaves else 0
      if len(indices) != length:
        raise ValueError(f'to_layout: {path} stacks {length} blocks, but params have '
                         f'{len(indices)} unscanned {prefix}NN blocks for it.')
      blocks = [_to_layout(params[block_name(prefix, i)], _one_layer(target), path)
                for i in indices]
      out[name] = _stack(blocks) if blocks else target
    else:
      if name not in params:
        raise ValueError(f'to_layout: {path} is missing from params.')
      out[name] = _to_layout(params[name], target, path)
  return out


def abstract_params(config) -> dict:
  """Parameter shapes of `basic.models.build(config)` (jax.eval_shape; nothing is allocated)."""
  from basic.models import dual_encoder  # pylint: disable=g-import-not-at-top
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, config.data.text_length), jnp.int32)
  return jax.eval_shape(dual_encoder.build(config).init, jax.random.key(0), images,
                        tokens)['params']


def for_config(params, config, like: Optional[Mapping] = None):
  """`params` in the layout `config` builds (its towers' `scan_layers`); `like` = precomputed
  `abstract_params(config)`."""
  return to_layout(params, abstract_params(config) if like is None else like)
