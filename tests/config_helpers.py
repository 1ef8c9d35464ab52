"""The tiny config with fields overridden by dotted path, for tests."""
import ml_collections

from configs import tiny


def tiny_config(fields: dict, *, type_safe: bool = True):
  """configs/tiny.py's config with `fields` ({'model.image.depth': 1, ...}) set; type_safe=False
  lets a field take a value of another type (bad configs for validation tests)."""
  config = tiny.get_config()
  if not type_safe:
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  for path, value in fields.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
