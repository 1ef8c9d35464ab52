"""Carrying parameters from one model to another: `adapt_params(loaded, target)`.

Used by `config.init_from` (a new stage of a recipe, fine-tuning a converted or souped
checkpoint): every parameter of the target model is taken from the loaded tree, which must have
the same structure. A learned position embedding whose shape differs (another image grid, another
text length) is resized to the target's shape by `resize_position_embedding`; any other shape
difference is an error naming the parameter.

With `config.init_from_params` only a part of the model is taken (LiT: the image tower):
`select(params, patterns)` is the part, the target of `adapt_params`, and `merge(params, taken)`
puts the taken part back among the other, freshly initialised, parameters.
"""
import re
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

# Parameter names (last path component) that are position-embedding tables.
POSITION_EMBEDDINGS = ('pos_embedding',)


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in key_path)


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear interpolation, half-pixel centres, edges clamped.

  The same sampling as torch's `F.interpolate(mode='linear', align_corners=False,
  antialias=False)` (OpenCLIP's `resize_pos_embed` / `resize_text_pos_embed`) and
  `jax.image.resize(method='linear', antialias=False)`.
  """
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  x = np.clip(x, 0, n_in - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = x - lo
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - frac)
  np.add.at(w, (np.arange(n_out), hi), frac)
  return w


def _square_side(n: int, name: str, shape) -> int:
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f'{name}: {n} positions of {tuple(shape)} are not a square grid; only '
                     'square patch grids can be resized.')
  return side


def resize_position_embedding(table: np.ndarray, shape: tuple, name: str) -> np.ndarray:
  """A position-embedding table [1, T, D] resized to `shape` [1, T', D] (float64 math).

  Which kind of table it is comes from the parameter path `name`:
    '.../image/...': a ViT table of a square patch grid (the ViT stores no class-token entry in
      it: its class token is a parameter of its own), bilinearly interpolated over the 2-D grid,
      sqrt(T) x sqrt(T) -> sqrt(T') x sqrt(T');
    '.../text/...': a text table over caption length, linearly interpolated over length L -> L'
      (as OpenCLIP's `resize_text_pos_embed`; a shorter target is interpolated, not truncated,
      so its positions still span the whole caption).
  Both sample with half-pixel centres and no antialiasing (see `_linear_weights`).

  Raises:
    ValueError naming the parameter for other shapes (another width, a non-square grid, a path
    that names neither tower).
  """
  table = np.asarray(table)
  shape = tuple(shape)
  if table.ndim != 3 or len(shape) != 3 or table.shape[0] != 1 or shape[0] != 1 or (
      table.shape[2] != shape[2]):
    raise ValueError(f'{name}: position embedding of shape {tuple(table.shape)} cannot be '
                     f'resized to {shape} (only the number of positions may differ).')
  parts = name.split('/')
  x = table[0].astype(np.float64)                                   # [T, D]
  if 'text' in parts:
    out = _linear_weights(x.shape[0], shape[1]) @ x
  elif 'image' in parts:
    h = _square_side(x.shape[0], name, table.shape)
    h2 = _square_side(shape[1], name, shape)
    w = _linear_weights(h, h2)                                       # [h2, h]
    grid = x.reshape(h, h, -1)
    out = np.einsum('ai,bj,ijd->abd', w, w, grid).reshape(h2 * h2, -1)
  else:
    raise ValueError(f'{name}: position embedding of shape {tuple(table.shape)} cannot be '
                     f'resized to {shape}: its path names neither the image nor the text tower.')
  return out[None].astype(table.dtype)


def adapt_params(loaded: Any, target: Any) -> Any:
  """The `target`-shaped tree of parameters taken from `loaded`.

  Args:
    loaded: a parameter tree (host or device arrays), e.g. restored from a checkpoint.
    target: the parameters (or ShapeDtypeStructs) of the model that will use them.

  Returns:
    A tree with target's structure, dtypes and shapes (numpy arrays).

  Raises:
    ValueError naming the first parameter the target has and `loaded` lacks, or whose shape
    differs and cannot be adapted.
  """
  flat_loaded = {_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
  used = set()

  def take(key_path, want):
    name = _path(key_path)
    if name not in flat_loaded:
      raise ValueError(f'init_from: parameter {name} {tuple(want.shape)} is missing from the '
                       'checkpoint.')
    value = np.asarray(flat_loaded[name])
    used.add(name)
    if value.shape != tuple(want.shape):
      if name.split('/')[-1] not in POSITION_EMBEDDINGS:
        raise ValueError(f'init_from: parameter {name} has shape {value.shape} in the '
                         f'checkpoint, {tuple(want.shape)} in the model.')
      value = resize_position_embedding(value, tuple(want.shape), name)
      logging.info('init_from: resized %s to %s.', name, tuple(want.shape))
    return value.astype(want.dtype)

  adapted = jax.tree_util.tree_map_with_path(take, target)
  unused = sorted(set(flat_loaded) - used)
  if unused:
    logging.warning('init_from: %d checkpoint parameters are not used by the model: %s',
                    len(unused), ', '.join(unused[:10]))
  return adapted


def matches(name: str, patterns: Sequence[str]) -> bool:
  """Whether one of the regexes `patterns` fully matches the '/'-joined parameter path `name`
  (e.g. 'image/encoder/block03/attn/query/kernel'); () matches every path."""
  return not patterns or any(re.fullmatch(p, name) for p in patterns)


def select(params: Mapping, patterns: Sequence[str], where: str = '') -> dict:
  """The leaves of the nested dict `params` whose paths `matches` `patterns`, nested as in
  `params`; modules with no such leaf are left out (a subtree: same paths, fewer of them)."""
  out = {}
  for key, value in params.items():
    name = f'{where}/{key}' if where else str(key)
    if isinstance(value, Mapping):
      part = select(value, patterns, name)
      if part:
        out[key] = part
    elif matches(name, patterns):
      out[key] = value
  return out


def merge(params: Mapping, taken: Mapping) -> dict:
  """`params` with every leaf that `taken` (a `select` of it, with new values) holds replaced
  by taken's: same structure as `params`."""
  return {key: (merge(value, taken[key]) if isinstance(value, Mapping) else taken[key])
          if key in taken else value for key, value in params.items()}
