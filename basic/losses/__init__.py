"""Contrastive losses: the loss registry (`config.loss`) and the loss function of a config.

A loss is one module (or object) registered here by one line:

  LOSSES.register('mine', 'my_package.my_loss')   # then config.loss = 'mine'

It exports (embeddings are L2-normalised [N, d], row i of each side a matching pair; the loss is
a float32 scalar over the whole global batch; `params` is the dict of its own parameters, those
of `parameters`):

  value(image_emb, text_emb, temperature, params, *, precision) -> ()
      the reference: may build the N x N logits.
  chunked(image_emb, text_emb, temperature, params, *, chunk_size, precision) -> ()   [optional]
      the same value and gradients holding c x N logits at a time (c = chunk_size).
  sharded(image_emb, text_emb, temperature, params, *, mesh, axes, chunk_size, precision) -> ()
      [optional] the rows split over the mesh `axes`, each device a c x N block at a time.
  parameters(config) -> ((name, initial value), ...)   [optional]
      scalar float32 parameters the loss owns (SigLIP's logit 'bias'); the DualEncoder holds them
      at the top level of its parameters (DualEncoder.extra_params) and the loss gets them back.
  validate(config)   [optional]
      config-only checks; raises config_lib.ConfigError naming the field.

A loss without `chunked` computes `value` (an N x N array) whatever config.loss_chunk_size asks,
logged; without `sharded`, a mesh gathers the embeddings on every device (as
config.loss_sharding = 'replicated'). `precision` is a key of basic.contrastive.PRECISIONS.
"""
from typing import Callable

from absl import logging
import jax

from basic import registry

LOSSES = registry.Registry('loss', 'config.loss')
LOSSES.register('softmax', 'basic.losses.softmax')
LOSSES.register('sigmoid', 'basic.losses.sigmoid')


def get(config):
  """The LOSSES entry of config.loss; ValueError naming the field."""
  return LOSSES.get(config.loss)


def extra_params(config) -> tuple[tuple[str, float], ...]:
  """((name, initial value), ...) of the scalar parameters config.loss owns (may be empty)."""
  entry = get(config)
  return tuple((str(name), float(value)) for name, value in (
      entry.parameters(config) if hasattr(entry, 'parameters') else ()))


def validate(config):
  """config.loss names a registered loss, and its own fields pass its `validate`."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  name = config_lib.get_field(config, 'loss')
  if name not in LOSSES:
    config_lib.fail('loss', name, f'unknown loss; registered: {sorted(LOSSES.names())}.')
  entry = LOSSES.get(name)
  if hasattr(entry, 'validate'):
    entry.validate(config)


def make(config, *, mesh=None, axes: tuple = (), chunk_size: int = 0,
         precision: str = 'highest') -> Callable:
  """-> fn(image_emb, text_emb, temperature, params) -> () of config.loss.

  `params` holds (at least) the loss's own parameters. With `axes` (mesh axes of size > 1) the
  sharded form with c = chunk_size rows per block; else the chunked form (chunk_size > 0) or the
  reference (0), the embeddings replicated on a mesh's devices.
  """
  entry = get(config)
  names = tuple(name for name, _ in extra_params(config))
  if chunk_size and not hasattr(entry, 'chunked'):
    logging.warning('config.loss=%r has no chunked form: it builds the N x N logits '
                    '(config.loss_chunk_size=%s is not used).', config.loss, chunk_size)
  if axes and not hasattr(entry, 'sharded'):
    logging.warning('config.loss=%r has no sharded form: every device computes the whole '
                    'loss (as config.loss_sharding=\'replicated\').', config.loss)
    axes = ()

  def loss(image_emb, text_emb, temperature, params):
    own = {name: params[name] for name in names}
    if axes:
      return entry.sharded(image_emb, text_emb, temperature, own, mesh=mesh, axes=axes,
                           chunk_size=chunk_size, precision=precision)
    if mesh is not None:
      from basic import sharding  # pylint: disable=g-import-not-at-top
      image_emb, text_emb = jax.lax.with_sharding_constraint(
          (image_emb, text_emb), sharding.replicated(mesh))
    if chunk_size and hasattr(entry, 'chunked'):
      return entry.chunked(image_emb, text_emb, temperature, own, chunk_size=chunk_size,
                           precision=precision)
    return entry.value(image_emb, text_emb, temperature, own, precision=precision)
  return loss
