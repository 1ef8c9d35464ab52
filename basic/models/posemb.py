"""Carrying parameters from one model to another: `adapt_params(loaded, target)`.

Used by `config.init_from` (a new stage of a recipe, fine-tuning a converted or souped
checkpoint): every parameter of the target model is taken from the loaded tree, which must have
the same structure. A learned position embedding whose shape differs (another image grid, another
text length) is resized to the target's shape by `resize_position_embedding`; any other shape
difference is an error naming the parameter.
"""
from typing import Any

from absl import logging
import jax
import numpy as np

# Parameter names (last path component) that are position-embedding tables.
POSITION_EMBEDDINGS = ('pos_embedding',)


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in key_path)


def resize_position_embedding(table: np.ndarray, shape: tuple, name: str) -> np.ndarray:
  """A position-embedding table of shape [1, T, D] resized to `shape` [1, T', D].

  Not implemented for shapes that differ; raises naming the parameter.
  """
  raise ValueError(f'{name}: position embedding of shape {tuple(table.shape)} cannot be '
                   f'resized to {tuple(shape)}.')


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
