"""A toy image tower for tests/test_toy_tower.py: one file, registered by one line
(`basic.models.IMAGE_TOWERS.register('toy_patches', 'toy_tower')`).

images [B, H, W, 3] -> p x p patches embedded (Conv, stride p) -> GELU -> mean over the grid ->
Dense(width): [B, width]. Its config is its fields: config.model.image = {name, width,
patch_size} (defaults below), passed straight through as Model(**cfg, dtype=..., name='image').
"""
import flax.linen as nn
import jax.numpy as jnp


class Model(nn.Module):
  width: int = 32
  patch_size: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train   # No dropout.
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), dtype=self.dtype, name='patches')(images)
    x = nn.gelu(x).mean(axis=(1, 2))                                   # [B, width]
    return nn.Dense(self.width, dtype=self.dtype, name='out')(x)


# Rules on paths inside the tower: the output layer's columns over 'model'.
SHARDING_RULES = ((r'^out/kernel$', (None, 'model')),)


def validate(config, field):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_int(config, f'{field}.width', 1)
  patch = config_lib.check_int(config, f'{field}.patch_size', 1)
  if config.data.image_size % patch:
    config_lib.fail(f'{field}.patch_size', patch,
                    f'must divide config.data.image_size={config.data.image_size}.')
