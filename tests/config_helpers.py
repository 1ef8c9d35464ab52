"""The tiny config with fields overridden by dotted path, for tests."""
from configs import tiny


def tiny_config(fields: dict):
  """configs/tiny.py's config with `fields` ({'model.image.depth': 1, ...}) set."""
  config = tiny.get_config()
  for path, value in fields.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
