"""Class names, prompt templates and class subsets of the evaluation tasks (package data files).

The files live in basic/evaluate/data/ (provenance in data/SOURCES.md). A task names them in its
config by a short name, or gives a path (local or gs://) to a text file of its own, one entry per
line:

  class_names  'imagenet1k' (1000), 'cifar10' (10), 'cifar100' (100); '' = the names of the
               data set's ClassLabel feature (underscores read as spaces).
  templates    'clip80' (CLIP's 80 ImageNet templates), 'clip_cifar' (CLIP's 18 CIFAR ones),
               'photo' ('a photo of a {}.'), 'synthetic' (the shapes data set's 6); '{}' marks the
               class name.
  subset       '' (all classes), 'imagenet_a', 'imagenet_r' (their 200 ImageNet-1k indices); a
               file holds sorted, unique class indices.
"""
import functools
import os
from typing import Optional

from etils import epath

from basic.data import synthetic

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

CLASS_NAMES = {
    'imagenet1k': 'imagenet1k_classnames.txt',
    'cifar10': 'cifar10_classnames.txt',
    'cifar100': 'cifar100_classnames.txt',
}
TEMPLATES = {
    'clip80': 'clip80_templates.txt',
    'clip_cifar': 'clip_cifar_templates.txt',
    'photo': ('a photo of a {}.',),
    'synthetic': tuple(synthetic.ZEROSHOT_TEMPLATES),
}
SUBSETS = {
    'imagenet_a': 'imagenet_a_indices.txt',
    'imagenet_r': 'imagenet_r_indices.txt',
}


def is_path(value: str) -> bool:
  """Whether a class_names / templates / subset value is a file path rather than a known name."""
  return '/' in value or value.endswith('.txt')


@functools.lru_cache(maxsize=None)
def _read_lines(path: str) -> tuple[str, ...]:
  text = epath.Path(path).read_text(encoding='utf-8')
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def _lookup(value: str, table: dict, field: str):
  """A known name -> its entries (from its package file or inline); a path -> its lines."""
  if value in table:
    entry = table[value]
    return entry if isinstance(entry, tuple) else _read_lines(os.path.join(DATA_DIR, entry))
  if is_path(value):
    if not epath.Path(value).exists():
      raise ValueError(f'{field}={value!r}: no such file.')
    return _read_lines(value)
  raise ValueError(f'{field}={value!r}: must be one of {sorted(table)} or a path to a text file '
                   '(one entry per line).')


def class_names(value: str, field: str = 'class_names') -> tuple[str, ...]:
  """-> the class names of `value` (a name of CLASS_NAMES or a path); `field` names the config
  field in errors."""
  return _lookup(value, CLASS_NAMES, field)


def templates(value: str, field: str = 'templates') -> tuple[str, ...]:
  """-> prompt templates, each with one '{}' for the class name."""
  result = _lookup(value, TEMPLATES, field)
  bad = [t for t in result if t.count('{}') != 1]
  if bad:
    raise ValueError(f'{field}={value!r}: every template needs exactly one {{}}; not {bad[0]!r}.')
  return result


def subset(value: str, num_classes: Optional[int] = None,
           field: str = 'subset') -> Optional[tuple[int, ...]]:
  """-> sorted unique class indices of `value`, or None for '' (all classes).

  Raises:
    ValueError naming `field` if the indices are not sorted and unique integers in
    [0, num_classes).
  """
  if not value:
    return None
  lines = _lookup(value, SUBSETS, field)
  try:
    indices = tuple(int(x) for x in lines)
  except ValueError as e:
    raise ValueError(f'{field}={value!r}: not a list of integers: {e}') from e
  if list(indices) != sorted(set(indices)) or not indices:
    raise ValueError(f'{field}={value!r}: the indices must be sorted, unique and not empty.')
  if indices[0] < 0 or (num_classes is not None and indices[-1] >= num_classes):
    raise ValueError(f'{field}={value!r}: indices must be in [0, {num_classes}), got '
                     f'{indices[0]} .. {indices[-1]}.')
  return indices
