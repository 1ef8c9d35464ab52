"""Tests for basic.contrastive: chunked losses equal the references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from basic import contrastive

jax.config.update('jax_enable_x64', False)

RTOL = 1e-5
CASES = [(16, 4, 8), (64, 16, 16), (64, 64, 32), (50, 16, 8), (37, 5, 16)]
TEMPERATURES = [0.07, 1.0]


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def embeddings(n, d, seed=0):
  """Two (n, d) float32 arrays of L2-normalised rows."""
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(2, n, d))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def numpy_softmax_loss(x, y, t):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  logits = x @ y.T / t

  def lse(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(
        axis)

  diag = np.diag(logits)
  return ((lse(logits, 1) - diag).mean() + (lse(logits, 0) - diag).mean()) / 2


def numpy_sigmoid_loss(x, y, t, b):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.shape[0]
  logits = x @ y.T / t + b
  labels = 2 * np.eye(n) - 1
  # log_sigmoid(s) = -log(1 + exp(-s)).
  return np.logaddexp(0., -labels * logits).sum() / n


def test_softmax_reference_matches_numpy():
  for t in TEMPERATURES:
    x, y = embeddings(48, 16)
    got = jax.jit(contrastive.softmax_loss)(x, y, t)
    assert rel_err(got, numpy_softmax_loss(x, y, t)) <= 1e-6


def test_sigmoid_reference_matches_numpy():
  for t in TEMPERATURES:
    x, y = embeddings(48, 16)
    got = jax.jit(contrastive.sigmoid_loss)(x, y, t, -3.)
    assert rel_err(got, numpy_sigmoid_loss(x, y, t, -3.)) <= 1e-6


def _value_and_grads(loss, args, chunk_size):
  f = lambda *a: loss(*a, chunk_size=chunk_size)
  argnums = tuple(range(len(args)))
  return jax.jit(jax.value_and_grad(f, argnums=argnums))(*args)


def _assert_chunked_equals_reference(loss, args, chunk_size):
  value, grads = _value_and_grads(loss, args, chunk_size)
  ref_value, ref_grads = _value_and_grads(loss, args, None)
  assert rel_err(value, ref_value) <= RTOL
  for g, ref_g in zip(grads, ref_grads):
    assert np.linalg.norm(ref_g) > 0
    assert g.shape == ref_g.shape and g.dtype == ref_g.dtype
    assert rel_err(g, ref_g) <= RTOL


@pytest.mark.parametrize('n,chunk,d', CASES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_softmax_chunked_equals_reference(n, chunk, d, temperature):
  x, y = embeddings(n, d, seed=n + chunk)
  _assert_chunked_equals_reference(contrastive.softmax_loss,
                                   (x, y, jnp.float32(temperature)), chunk)


@pytest.mark.parametrize('n,chunk,d', CASES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_sigmoid_chunked_equals_reference(n, chunk, d, temperature):
  x, y = embeddings(n, d, seed=n + chunk)
  bias = jnp.float32(-10. if temperature < 1 else -1.)
  _assert_chunked_equals_reference(contrastive.sigmoid_loss,
                                   (x, y, jnp.float32(temperature), bias),
                                   chunk)


def test_chunked_matches_numpy_value():
  x, y = embeddings(37, 16)
  got = jax.jit(
      lambda a, b: contrastive.softmax_loss(a, b, 0.07, chunk_size=5))(x, y)
  assert rel_err(got, numpy_softmax_loss(x, y, 0.07)) <= RTOL
  got = jax.jit(lambda a, b: contrastive.sigmoid_loss(
      a, b, 0.07, -10., chunk_size=5))(x, y)
  assert rel_err(got, numpy_sigmoid_loss(x, y, 0.07, -10.)) <= RTOL


def test_bfloat16_inputs_give_bfloat16_grads():
  x, y = embeddings(32, 8)
  x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  for loss, args in [(contrastive.softmax_loss, (x, y, jnp.float32(0.07))),
                     (contrastive.sigmoid_loss,
                      (x, y, jnp.float32(0.07), jnp.float32(-10.)))]:
    value, grads = _value_and_grads(loss, args, 8)
    ref_value, ref_grads = _value_and_grads(loss, args, None)
    assert value.dtype == jnp.float32
    assert rel_err(value, ref_value) <= RTOL
    for g, ref_g, a in zip(grads, ref_grads, args):
      assert g.dtype == a.dtype
      # Both compute in float32; only the final cast to bfloat16 rounds.
      assert rel_err(g, ref_g) <= 1e-2


def _max_intermediate_size(jaxpr):
  """Largest number of elements of any equation output, sub-jaxprs included."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, 'shape', ())
      biggest = max(biggest, int(np.prod(shape, dtype=np.int64)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      biggest = max(biggest, _max_intermediate_size(sub))
  return biggest


@pytest.mark.parametrize('loss,extra', [(contrastive.softmax_loss, ()),
                                        (contrastive.sigmoid_loss, (-10.,))])
def test_chunked_never_materialises_n_by_n(loss, extra):
  n, chunk, d = 4096, 256, 16
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  t = jax.ShapeDtypeStruct((), jnp.float32)

  def largest(chunk_size):
    f = lambda a, b, temp: loss(a, b, temp, *extra, chunk_size=chunk_size)
    grad = jax.grad(f, argnums=(0, 1, 2))
    return _max_intermediate_size(jax.make_jaxpr(grad)(x, x, t).jaxpr)

  assert largest(None) >= n * n // 2  # The check can fail.
  assert largest(chunk) < n * n // 2
  assert largest(chunk) <= chunk * n
