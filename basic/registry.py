"""Registries: the extension points of `basic`, each a name -> entry table filled by one line.

A kind of extension (image tower, text tower, loss, data source, evaluator) has one `Registry`;
a new extension is one new module plus one registration line, e.g. in basic/models/__init__.py

  IMAGE_TOWERS.register('vit', 'basic.models.vit')

The entry is a module path, imported when first asked for (`get`), so that a registry line costs
nothing until the extension is used (TFDS, torch or tensorflow-text stay unimported when their
extension is not chosen), or an object registered directly (tests, notebooks, user code):

  IMAGE_TOWERS.register('toy', my_module)

What an entry must export is stated by the registry's owner (e.g. a tower module exports
`Model`, `validate` and `SHARDING_RULES`); `Registry.get` returns the module or object itself.
Unknown names fail naming the config field and the registered names.
"""
import importlib
from types import ModuleType
from typing import Any, Union


class Registry:
  """name -> module (imported lazily from its dotted path) or object.

  Args:
    kind: what the entries are, for messages ('image tower').
    field: the config field that names an entry, for messages ('config.model.image.name').
  """

  def __init__(self, kind: str, field: str):
    self.kind = kind
    self.field = field
    self._entries: dict[str, Union[str, Any]] = {}

  def register(self, name: str, entry: Union[str, ModuleType, Any], *, replace: bool = False):
    """Registers `entry` (a dotted module path, a module, or any object) under `name`."""
    if not isinstance(name, str) or not name:
      raise ValueError(f'{self.kind} names are non-empty strings, got {name!r}.')
    if name in self._entries and not replace and self._entries[name] is not entry:
      raise ValueError(f'{self.kind} {name!r} is already registered ({self._entries[name]!r}); '
                       'pass replace=True to replace it.')
    self._entries[name] = entry
    return entry

  def unregister(self, name: str):
    self._entries.pop(name, None)

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def get(self, name: str):
    """The entry registered under `name` (a dotted path is imported once and cached)."""
    if name not in self._entries:
      raise ValueError(f'{self.field}={name!r}: unknown {self.kind}; registered: '
                       f'{sorted(self._entries)}.')
    entry = self._entries[name]
    if isinstance(entry, str):
      entry = self._entries[name] = importlib.import_module(entry)
    return entry

  def __repr__(self):
    return f'Registry({self.kind!r}, {sorted(self._entries)})'
