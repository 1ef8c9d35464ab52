"""A toy loss for tests/test_extensions.py: one file, registered by one line
(`basic.losses.LOSSES.register('toy_hinge', 'toy_loss')`).

A symmetric hinge on similarities with a learnable margin (a scalar parameter the loss owns):
loss = mean_{i != j} relu(m + s_ij - s_ii) + relu(m + s_ji - s_ii) over s = x y^T / t. Only the
reference form: the framework falls back to it for chunked and sharded configs.
"""
import jax
import jax.numpy as jnp


def parameters(config):
  return (('margin', config.model.toy_margin_init),)


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_positive(config, 'model.toy_margin_init')


def value(image_emb, text_emb, temperature, params, *, precision='highest'):
  del precision
  s = jnp.asarray(image_emb, jnp.float32) @ jnp.asarray(text_emb, jnp.float32).T / temperature
  diag = jnp.diagonal(s)
  off = 1.0 - jnp.eye(s.shape[0])
  m = params['margin']
  terms = jax.nn.relu(m + s - diag[:, None]) + jax.nn.relu(m + s - diag[None, :])
  return jnp.sum(terms * off) / jnp.sum(off)
