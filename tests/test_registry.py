"""basic.registry: lazy import of dotted paths, direct objects, clear errors."""
import sys
import types

import pytest

from basic import registry


def test_lazy_import_and_cache():
  reg = registry.Registry('thing', 'config.thing')
  sys.modules.pop('basic.soup', None)
  reg.register('soup', 'basic.soup')
  assert 'basic.soup' not in sys.modules          # Registering imports nothing.
  module = reg.get('soup')
  assert module is sys.modules['basic.soup'] and reg.get('soup') is module
  assert reg.names() == ('soup',) and 'soup' in reg


def test_objects_replace_and_errors():
  reg = registry.Registry('loss', 'config.loss')
  toy = types.SimpleNamespace(name='toy')
  assert reg.register('toy', toy) is toy and reg.get('toy') is toy
  reg.register('toy', toy)                         # Same entry again: fine.
  with pytest.raises(ValueError, match="loss 'toy' is already registered"):
    reg.register('toy', object())
  other = object()
  reg.register('toy', other, replace=True)
  assert reg.get('toy') is other
  with pytest.raises(ValueError, match=r"config.loss='nope': unknown loss; registered: \['toy'\]"):
    reg.get('nope')
  reg.unregister('toy')
  assert reg.names() == ()
