"""Contrastive losses over a batch of N (image, text) embedding pairs.

Two losses, each with a plain reference and a chunked implementation that
gives the same value and the same gradients:

* `softmax_loss`: symmetric InfoNCE (CLIP, ALIGN, BASIC).
* `sigmoid_loss`: pairwise sigmoid loss (SigLIP).

Both take embeddings as given (callers L2-normalise them) and compute in
float32 whatever the input dtype; gradients come back in the input dtype.

Memory. The reference builds the N x N logits (and autodiff keeps N x N
softmaxes for the backward pass), which is what limits contrastive batch size.
With `chunk_size=c` the losses are `jax.custom_vjp` functions that never hold
more than a c x N block of logits:

* forward: `lax.map` over row chunks computes the c x N logits block
  `image_emb[chunk] @ text_emb.T / temperature`, reduces it to per-row
  log-sum-exp (softmax) or a partial loss sum (sigmoid), and drops it; the
  softmax loss makes a second pass over column chunks for the per-column
  log-sum-exp. The diagonal logits are N dot products.
* residuals: the embeddings, temperature (and bias), and for the softmax loss
  the row and column log-sum-exp vectors (N each): O(N*d) memory.
* backward: one `lax.scan` over row chunks recomputes the c x N block, forms
  dL/dlogits for it and accumulates the image gradient of the chunk rows, the
  text gradient of all rows (carried) and the temperature (and bias)
  gradients.

Peak memory beyond the embeddings is therefore O(c*N): about three c x N
float32 buffers (logits, probabilities, their product with the cotangent).

If c does not divide N, the chunked (row) side is zero-padded to a multiple of
c and the padded rows are masked out of every sum; the other side always holds
the N real rows.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# config.loss_precision -> the precision of the logits matmuls (and of their gradients). On TPU an
# f32 matmul at 'highest' costs several bf16 MXU passes ('high': 3, 'default': 1); on CPU all
# three are full f32. BENCHMARKS.md ("Loss precision") gives the measured errors of each.
PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'high': jax.lax.Precision.HIGH,
              'default': jax.lax.Precision.DEFAULT}
_HIGHEST = 'highest'


def precision_of(name: str) -> jax.lax.Precision:
  """'highest' | 'high' | 'default' -> jax.lax.Precision; ValueError naming the choices."""
  if name not in PRECISIONS:
    raise ValueError(f'precision={name!r}: expected one of {tuple(PRECISIONS)}.')
  return PRECISIONS[name]


def _matmul(a, b, precision=_HIGHEST):
  """a @ b in float32 at `precision` (a key of PRECISIONS; full f32 by default)."""
  return jnp.matmul(a, b, precision=PRECISIONS[precision])


def _pairwise_logits(image_emb, text_emb, temperature, precision=_HIGHEST):
  """(n, d) x (N, d) -> (n, N) logits `image_emb @ text_emb.T / temperature`."""
  return _matmul(image_emb, text_emb.T, precision) / temperature


def _diagonal_logits(image_emb, text_emb, temperature):
  """(N, d), (N, d) -> (N,) logits of the matching pairs."""
  return jnp.sum(image_emb * text_emb, axis=-1) / temperature


def _to_f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _check_inputs(image_emb, text_emb):
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(
        'Expected image_emb and text_emb of the same shape (N, d), got '
        f'{image_emb.shape} and {text_emb.shape}.')


def _chunking(n, chunk_size):
  """Returns (chunk, num_chunks) with chunk * num_chunks >= n."""
  chunk = min(int(chunk_size), n)
  return chunk, -(-n // chunk)


def _split_rows(x, chunk, num_chunks):
  """(N, ...) -> (num_chunks, chunk, ...), zero-padding the tail rows."""
  pad = chunk * num_chunks - x.shape[0]
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(num_chunks, chunk, *x.shape[1:])


def _chunk_rows(n, chunk, num_chunks):
  """(num_chunks, chunk) global row indices and validity mask (index < n)."""
  rows = jnp.arange(chunk * num_chunks).reshape(num_chunks, chunk)
  return rows, rows < n


def _is_diagonal(rows, n):
  """(c,) global row indices -> (c, N) bool, True where column == row."""
  return rows[:, None] == jnp.arange(n)[None, :]


# ----------------------------------------------------------------------------
# Softmax (InfoNCE) loss.
# ----------------------------------------------------------------------------


def _softmax_loss_reference(image_emb, text_emb, temperature, precision=_HIGHEST):
  """Builds the (N, N) logits; float32 scalar."""
  image_emb, text_emb, temperature = _to_f32(image_emb, text_emb, temperature)
  logits = _pairwise_logits(image_emb, text_emb, temperature, precision)
  diag = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - diag
  text_to_image = jax.nn.logsumexp(logits, axis=0) - diag
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def _row_logsumexp(queries, keys, temperature, chunk, precision):
  """Per-row log-sum-exp of `queries @ keys.T / temperature`, c rows at a time.

  Args:
    queries: (N, d) float32, the chunked side.
    keys: (N, d) float32, always used whole.
    temperature: () float32.
    chunk: rows per chunk, c.
    precision: a key of PRECISIONS.

  Returns:
    (N,) float32.
  """
  n = queries.shape[0]
  chunk, num_chunks = _chunking(n, chunk)
  q = _split_rows(queries, chunk, num_chunks)
  lse = jax.lax.map(
      lambda qk: jax.nn.logsumexp(
          _pairwise_logits(qk, keys, temperature, precision), axis=1), q)
  return lse.reshape(-1)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_loss_chunked(image_emb, text_emb, temperature, chunk, precision):
  loss, _ = _softmax_loss_chunked_fwd(image_emb, text_emb, temperature, chunk, precision)
  return loss


def _softmax_loss_chunked_fwd(image_emb, text_emb, temperature, chunk, precision):
  x, y, t = _to_f32(image_emb, text_emb, temperature)
  n = x.shape[0]
  row_lse = _row_logsumexp(x, y, t, chunk, precision)  # (N,) over texts, per image.
  col_lse = _row_logsumexp(y, x, t, chunk, precision)  # (N,) over images, per text.
  diag = _diagonal_logits(x, y, t)
  loss = (jnp.sum(row_lse) + jnp.sum(col_lse) - 2 * jnp.sum(diag)) / (2 * n)
  return loss, (image_emb, text_emb, temperature, row_lse, col_lse)


def _softmax_loss_chunked_bwd(chunk, precision, residuals, g):
  image_emb, text_emb, temperature, row_lse, col_lse = residuals
  x, y, t = _to_f32(image_emb, text_emb, temperature)
  n = x.shape[0]
  chunk, num_chunks = _chunking(n, chunk)
  rows, valid = _chunk_rows(n, chunk, num_chunks)
  scale = g.astype(jnp.float32) / (2 * n)

  def step(carry, xs):
    d_y, d_t = carry
    x_k, lse_k, rows_k, valid_k = xs
    logits = _pairwise_logits(x_k, y, t, precision)  # (c, N)
    d_logits = (jnp.exp(logits - lse_k[:, None])
                + jnp.exp(logits - col_lse[None, :])
                - 2 * _is_diagonal(rows_k, n))
    d_logits = jnp.where(valid_k[:, None], d_logits * scale, 0.)
    d_x_k = _matmul(d_logits, y, precision) / t  # (c, d)
    d_y = d_y + _matmul(d_logits.T, x_k, precision) / t  # (N, d)
    d_t = d_t - jnp.sum(d_logits * logits) / t
    return (d_y, d_t), d_x_k

  xs = (_split_rows(x, chunk, num_chunks),
        _split_rows(row_lse, chunk, num_chunks), rows, valid)
  init = (jnp.zeros_like(y), jnp.zeros((), jnp.float32))
  (d_y, d_t), d_x = jax.lax.scan(step, init, xs)
  d_x = d_x.reshape(-1, x.shape[1])[:n]
  return (d_x.astype(image_emb.dtype), d_y.astype(text_emb.dtype),
          d_t.astype(temperature.dtype))


_softmax_loss_chunked.defvjp(_softmax_loss_chunked_fwd,
                             _softmax_loss_chunked_bwd)


def softmax_loss(image_emb: jax.Array,
                 text_emb: jax.Array,
                 temperature,
                 *,
                 chunk_size: Optional[int] = None,
                 precision: str = 'highest') -> jax.Array:
  """Symmetric InfoNCE loss of N matching (image, text) pairs.

  loss = (CE(image -> text) + CE(text -> image)) / 2, each cross-entropy the
  mean over the N pairs of `logsumexp(logits_i) - logits_ii`, with
  logits = image_emb @ text_emb.T / temperature.

  Args:
    image_emb: (N, d) image embeddings, used as given (not normalised here).
    text_emb: (N, d) text embeddings; row i matches image row i.
    temperature: () positive scalar.
    chunk_size: None or 0 for the reference that builds the (N, N) logits;
      c > 0 for the chunked version (same value and gradients, O(c*N) memory;
      c need not divide N).
    precision: 'highest' (default) | 'high' | 'default', the precision of the
      logits matmuls and of their gradients (PRECISIONS).

  Returns:
    () float32 loss.
  """
  _check_inputs(image_emb, text_emb)
  precision_of(precision)
  temperature = jnp.asarray(temperature)
  if not chunk_size:
    return _softmax_loss_reference(image_emb, text_emb, temperature, precision)
  return _softmax_loss_chunked(image_emb, text_emb, temperature,
                               int(chunk_size), precision)


# ----------------------------------------------------------------------------
# Sigmoid (SigLIP) loss.
# ----------------------------------------------------------------------------


def _pair_labels(rows, n):
  """(c,) global row indices -> (c, N) labels: +1 on the diagonal, else -1."""
  return jnp.where(_is_diagonal(rows, n), 1., -1.)


def _sigmoid_loss_reference(image_emb, text_emb, temperature, bias, precision=_HIGHEST):
  """Builds the (N, N) logits; float32 scalar."""
  x, y, t, b = _to_f32(image_emb, text_emb, temperature, bias)
  n = x.shape[0]
  logits = _pairwise_logits(x, y, t, precision) + b
  labels = _pair_labels(jnp.arange(n), n)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_loss_chunked(image_emb, text_emb, temperature, bias, chunk, precision):
  loss, _ = _sigmoid_loss_chunked_fwd(image_emb, text_emb, temperature, bias,
                                      chunk, precision)
  return loss


def _sigmoid_loss_chunked_fwd(image_emb, text_emb, temperature, bias, chunk, precision):
  x, y, t, b = _to_f32(image_emb, text_emb, temperature, bias)
  n = x.shape[0]
  chunk, num_chunks = _chunking(n, chunk)
  rows, valid = _chunk_rows(n, chunk, num_chunks)

  def chunk_sum(xs):
    x_k, rows_k, valid_k = xs
    logits = _pairwise_logits(x_k, y, t, precision) + b  # (c, N)
    terms = jax.nn.log_sigmoid(_pair_labels(rows_k, n) * logits)
    return jnp.sum(jnp.where(valid_k[:, None], terms, 0.))

  sums = jax.lax.map(chunk_sum, (_split_rows(x, chunk, num_chunks), rows,
                                 valid))
  loss = -jnp.sum(sums) / n
  return loss, (image_emb, text_emb, temperature, bias)


def _sigmoid_loss_chunked_bwd(chunk, precision, residuals, g):
  image_emb, text_emb, temperature, bias = residuals
  x, y, t, b = _to_f32(image_emb, text_emb, temperature, bias)
  n = x.shape[0]
  chunk, num_chunks = _chunking(n, chunk)
  rows, valid = _chunk_rows(n, chunk, num_chunks)
  scale = g.astype(jnp.float32) / n

  def step(carry, xs):
    d_y, d_t, d_b = carry
    x_k, rows_k, valid_k = xs
    logits = _pairwise_logits(x_k, y, t, precision)  # (c, N), without the bias.
    labels = _pair_labels(rows_k, n)
    # d/ds of -log_sigmoid(z * s) is -z * sigmoid(-z * s).
    d_logits = -labels * jax.nn.sigmoid(-labels * (logits + b))
    d_logits = jnp.where(valid_k[:, None], d_logits * scale, 0.)
    d_x_k = _matmul(d_logits, y, precision) / t  # (c, d)
    d_y = d_y + _matmul(d_logits.T, x_k, precision) / t  # (N, d)
    d_t = d_t - jnp.sum(d_logits * logits) / t
    d_b = d_b + jnp.sum(d_logits)
    return (d_y, d_t, d_b), d_x_k

  xs = (_split_rows(x, chunk, num_chunks), rows, valid)
  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros_like(y), zero, zero)
  (d_y, d_t, d_b), d_x = jax.lax.scan(step, init, xs)
  d_x = d_x.reshape(-1, x.shape[1])[:n]
  return (d_x.astype(image_emb.dtype), d_y.astype(text_emb.dtype),
          d_t.astype(temperature.dtype), d_b.astype(bias.dtype))


_sigmoid_loss_chunked.defvjp(_sigmoid_loss_chunked_fwd,
                             _sigmoid_loss_chunked_bwd)


def sigmoid_loss(image_emb: jax.Array,
                 text_emb: jax.Array,
                 temperature,
                 bias,
                 *,
                 chunk_size: Optional[int] = None,
                 precision: str = 'highest') -> jax.Array:
  """SigLIP loss of N matching (image, text) pairs.

  loss = -(1/N) sum_ij log_sigmoid(z_ij * (image_emb_i . text_emb_j
  / temperature + bias)), with z_ii = 1 and z_ij = -1 for i != j.

  Args:
    image_emb: (N, d) image embeddings, used as given (not normalised here).
    text_emb: (N, d) text embeddings; row i matches image row i.
    temperature: () positive scalar.
    bias: () scalar added to every logit.
    chunk_size: None or 0 for the reference that builds the (N, N) logits;
      c > 0 for the chunked version (same value and gradients, O(c*N) memory;
      c need not divide N).
    precision: 'highest' (default) | 'high' | 'default' (PRECISIONS).

  Returns:
    () float32 loss.
  """
  _check_inputs(image_emb, text_emb)
  precision_of(precision)
  temperature = jnp.asarray(temperature)
  bias = jnp.asarray(bias)
  if not chunk_size:
    return _sigmoid_loss_reference(image_emb, text_emb, temperature, bias, precision)
  return _sigmoid_loss_chunked(image_emb, text_emb, temperature, bias,
                               int(chunk_size), precision)
