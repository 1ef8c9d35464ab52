"""Inputs and parameters for tower tests that should not compile an init program."""
import jax
import jax.numpy as jnp
import numpy as np


def random_batch(config, n, seed=0):
  """{'image': uint8 [n, S, S, 3], 'text': int32 [n, L]} at the config's image size / length."""
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return {'image': jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
          'text': jnp.asarray(rng.integers(1, 200, (n, config.data.text_length)), jnp.int32)}


def random_params(model, batch, seed=0):
  """Parameters of the model's shapes drawn with numpy: no init program to compile."""
  shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b['image'], b['text']),
                          batch)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
