"""Model towers and the DualEncoder: the tower registries (`config.model.image.name`,
`config.model.text.name`).

A tower is one module registered here by one line. It exports:

  Model             its flax module. Every field but `dtype` is a config key: `config.model.image`
                    (less `name`) is passed straight through, `Model(**cfg, dtype=..., name=...)`,
                    so a field's default on the module is the config's default
                    (`basic.config_defaults` fills it into configs that lack it).
  validate(config, field)
                    config-only checks of `config.<field>` (its tower config, already filled with
                    the defaults; `config` whole, for cross-field checks such as
                    data.image_size); raises config_lib.ConfigError naming the field.
  SHARDING_RULES    ((regex, spec), ...) re.search'ed on parameter paths inside the tower (as
                    basic.sharding does on whole paths; '^' anchors at the tower's root);
                    `sharding_rules(config.model)` gathers them for config.sharding.rules.

  IMAGE_TOWERS.register('mine', 'my_package.my_tower')   # then config.model.image.name = 'mine'
"""
from basic import registry

IMAGE_TOWERS = registry.Registry('image tower', 'config.model.image.name')
IMAGE_TOWERS.register('vit', 'basic.models.vit')
IMAGE_TOWERS.register('coatnet', 'basic.models.coatnet')
IMAGE_TOWERS.register('convnext', 'basic.models.convnext')

TEXT_TOWERS = registry.Registry('text tower', 'config.model.text.name')
TEXT_TOWERS.register('transformer', 'basic.models.text')

# pylint: disable=g-import-not-at-top,wrong-import-position  (after the registries they read)
from basic.models.dual_encoder import DTYPES
from basic.models.dual_encoder import DualEncoder
from basic.models.dual_encoder import build
from basic.models.dual_encoder import sharding_rules
from basic.models.dual_encoder import temperature_from_params
from basic.models.dual_encoder import tower_fields

__all__ = ['IMAGE_TOWERS', 'TEXT_TOWERS', 'DTYPES', 'DualEncoder', 'build', 'sharding_rules',
           'temperature_from_params', 'tower_fields']
