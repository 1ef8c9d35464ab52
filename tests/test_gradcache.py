"""Tests for basic.gradcache: the cached step equals full-batch autodiff."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import contrastive
from basic import gradcache

jax.config.update('jax_enable_x64', False)

RTOL = 1e-5
BATCH = 32
IMAGE_SHAPE = (8, 8, 3)
TEXT_LEN = 6
VOCAB = 50
EMBED_DIM = 16
HIDDEN = 32
DROPOUT = 0.1


class ImageTower(nn.Module):
  """(m, 8, 8, 3) float images -> (m, EMBED_DIM) unit vectors."""

  @nn.compact
  def __call__(self, images):
    x = images.reshape(images.shape[0], -1)
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    x = nn.Dropout(DROPOUT, deterministic=False)(x)
    x = nn.Dense(EMBED_DIM)(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TextTower(nn.Module):
  """(m, TEXT_LEN) int tokens -> (m, EMBED_DIM) unit vectors (embedding bag)."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, HIDDEN)(tokens).mean(axis=1)
    x = nn.Dropout(DROPOUT, deterministic=False)(nn.gelu(x))
    x = nn.Dense(EMBED_DIM)(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class DualEncoder(nn.Module):

  @nn.compact
  def __call__(self, batch):
    self.param('log_temperature', lambda _: jnp.log(jnp.float32(0.07)))
    self.param('bias', lambda _: jnp.float32(-5.))
    return ImageTower()(batch['image']), TextTower()(batch['text'])


MODEL = DualEncoder()


def encode_fn(params, batch, rng):
  return MODEL.apply({'params': params}, batch, rngs={'dropout': rng})


def softmax_loss_fn(params, image_emb, text_emb, chunk_size=None):
  return contrastive.softmax_loss(image_emb, text_emb,
                                  jnp.exp(params['log_temperature']),
                                  chunk_size=chunk_size)


def sigmoid_loss_fn(params, image_emb, text_emb):
  return contrastive.sigmoid_loss(image_emb, text_emb,
                                  jnp.exp(params['log_temperature']),
                                  params['bias'], chunk_size=8)


def make_batch(n=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': jnp.asarray(rng.normal(size=(n, *IMAGE_SHAPE)), jnp.float32),
      'text': jnp.asarray(rng.integers(0, VOCAB, size=(n, TEXT_LEN)),
                          jnp.int32),
  }


@functools.lru_cache(maxsize=None)
def init_params():
  batch = make_batch(2)
  return MODEL.init({'params': jax.random.key(1),
                     'dropout': jax.random.key(2)}, batch)['params']


def reference(loss_fn, params, batch, rng, num_microbatches):
  def loss(p):
    return loss_fn(p, *gradcache.encode_full_batch(encode_fn, p, batch, rng,
                                                   num_microbatches))

  return jax.jit(jax.value_and_grad(loss))(params)


def cached(loss_fn, params, batch, rng, num_microbatches):
  f = gradcache.value_and_grad(encode_fn, loss_fn,
                               num_microbatches=num_microbatches)
  return jax.jit(f)(params, batch, rng)


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def max_rel_err(x, y):
  """Largest per-leaf relative error over leaves of `y` with non-zero norm."""
  pairs = zip(jax.tree.leaves(x), jax.tree.leaves(y))
  return max(rel_err(a, b) for a, b in pairs if np.linalg.norm(b) > 0)


LOSSES = {
    'softmax': softmax_loss_fn,
    'softmax_chunked': functools.partial(softmax_loss_fn, chunk_size=8),
    'sigmoid': sigmoid_loss_fn,
}


@pytest.mark.parametrize('num_microbatches', [1, 2, 8])
@pytest.mark.parametrize('loss_name', sorted(LOSSES))
def test_cached_equals_full_batch_autodiff(num_microbatches, loss_name):
  loss_fn = LOSSES[loss_name]
  params, batch, rng = init_params(), make_batch(), jax.random.key(3)
  loss, grads = cached(loss_fn, params, batch, rng, num_microbatches)
  ref_loss, ref_grads = reference(loss_fn, params, batch, rng,
                                  num_microbatches)
  assert rel_err(loss, ref_loss) <= RTOL
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for g, ref_g in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.shape == ref_g.shape and g.dtype == ref_g.dtype
    if loss_name.startswith('softmax') and ref_g.shape == ():
      continue  # The softmax loss does not read the sigmoid bias.
    assert np.linalg.norm(ref_g) > 0
    assert rel_err(g, ref_g) <= RTOL


def test_dropout_is_active_and_rng_mismatch_is_detected():
  params, batch, rng = init_params(), make_batch(), jax.random.key(3)
  loss, grads = cached(softmax_loss_fn, params, batch, rng, 8)
  ref_loss, ref_grads = reference(softmax_loss_fn, params, batch,
                                  jax.random.key(4), 8)
  assert rel_err(loss, ref_loss) > 1e-3
  assert max_rel_err(grads, ref_grads) > 1e-3


def test_microbatch_round_trip_and_strided_layout():
  n, k = 12, 3
  batch = {'a': jnp.arange(n), 'b': jnp.arange(n * 2).reshape(n, 2)}
  mbs = gradcache.microbatch(batch, k)
  assert mbs['a'].shape == (k, n // k)
  assert mbs['b'].shape == (k, n // k, 2)
  for i in range(k):
    np.testing.assert_array_equal(mbs['a'][i], np.arange(n)[i::k])
    np.testing.assert_array_equal(mbs['b'][i], batch['b'][i::k])
  back = gradcache.unmicrobatch(mbs)
  for key in batch:
    np.testing.assert_array_equal(back[key], batch[key])


def test_microbatch_rng_is_fold_in():
  rng = jax.random.key(0)
  np.testing.assert_array_equal(
      jax.random.key_data(gradcache.microbatch_rng(rng, 5)),
      jax.random.key_data(jax.random.fold_in(rng, 5)))


def test_encode_full_batch_single_microbatch_is_plain_encode():
  params, batch, rng = init_params(), make_batch(), jax.random.key(3)
  got = gradcache.encode_full_batch(encode_fn, params, batch, rng, 1)
  want = encode_fn(params, batch, jax.random.fold_in(rng, 0))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_indivisible_batch_raises():
  with pytest.raises(ValueError, match='batch_size=10.*microbatch_size'):
    gradcache.microbatch({'a': jnp.zeros((10, 2))}, 4)
  f = gradcache.value_and_grad(encode_fn, softmax_loss_fn, num_microbatches=3)
  with pytest.raises(ValueError, match='batch_size=32'):
    f(init_params(), make_batch(), jax.random.key(0))


@pytest.mark.parametrize('unroll', [2, 8])
def test_unroll_gives_the_same_result(unroll):
  """Unrolling the microbatch loops changes the schedule, not the math (K = 8, dropout on)."""
  params, batch, rng = init_params(), make_batch(), jax.random.key(3)
  loss_fn = LOSSES['softmax']
  rolled = jax.jit(gradcache.value_and_grad(encode_fn, loss_fn, num_microbatches=8))
  unrolled = jax.jit(gradcache.value_and_grad(encode_fn, loss_fn, num_microbatches=8,
                                              unroll=unroll))
  (loss_a, grads_a), (loss_b, grads_b) = rolled(params, batch, rng), unrolled(params, batch, rng)
  assert rel_err(loss_b, loss_a) <= RTOL
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    # Elementwise; the sigmoid bias (unused by this loss) has an exactly-zero gradient in both.
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-9)
