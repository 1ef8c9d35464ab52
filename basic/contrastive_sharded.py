"""The contrastive losses of `basic.contrastive`, sharded over the devices of a mesh.

`basic.contrastive` computes the N x N loss on whatever holds the (N, d) embeddings: on a mesh
whose embeddings are replicated, every device repeats the whole O(N^2 d) work. Here the batch
axis of both embeddings is split over P devices (the mesh axes `axes`, in the row-major block
order of `PartitionSpec(axes)`), each device p owning n = N / P rows: images x_p and texts y_p,
global rows [p n, (p + 1) n). The value and every gradient equal the single-device loss
(`basic.contrastive`) to float32 rounding; only the order of the sums differs.

Per device (`jax.shard_map`, explicit collectives):

* gather the texts once: Y = all_gather(y_p), (N, d). Only one side is gathered;
* softmax, forward, one pass over c x N row chunks of L_p = x_p Y^T / t (n x N):
  - per-row log-sum-exp over all N texts (the image -> text term), complete locally;
  - per-column partial log-sum-exp over this device's n images, accumulated over the chunks with
    a running max and a rescaled sum (the online log-sum-exp), then combined across devices:
    M = pmax(lse_p), col_lse = M + log(psum(exp(lse_p - M))) (numerically stable);
  - loss = (psum(sum row_lse_p - 2 sum diag_p) + sum col_lse) / (2 N), the diagonal logits
    x_i . y_i / t of the device's own pairs;
* softmax, backward: the chunks are recomputed; with G = dL/dlogits = (softmax_row +
  softmax_col - 2 I) g / (2 N) for the chunk,
  d x_p = G Y / t (own rows, local), d Y = sum_chunks G^T x_chunk / t (N, d: every device's
  partial text gradient) reduced to the owners with psum_scatter (reduce-scatter), and
  d t = -psum(sum G * logits) / t;
* sigmoid: the same row blocks, loss = -psum(sum log_sigmoid(z * (L_p + b))) / N, gradients as
  above with d b = psum(sum G).

Residuals between the forward and backward passes: x_p, y_p, t (and b), row_lse_p (n) and the
replicated col_lse (N); Y is gathered again in the backward pass (an N x d all-gather is cheap
next to the 6 n N d FLOPs it feeds). Per-device memory beyond the embeddings: Y and dY (N x d
each) and the c x N chunk buffers (logits, probabilities, their product: about 3 c N float32).

Work per device: softmax 8 n N d FLOPs of matmul (forward 2, backward recompute 2 + 4) against
10 N^2 d for the replicated chunked loss (two forward passes); sigmoid 8 n N d against 8 N^2 d.
So P devices do 1/P (sigmoid) and 0.8/P (softmax) of the replicated per-device work.

The reference beside this optimised path is `basic.contrastive.softmax_loss` / `sigmoid_loss`
on one device (tests/test_contrastive_sharded.py compares values and gradients).
"""

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from basic import contrastive

AxisNames = Union[str, Sequence[str]]

# The single-device module's building blocks: the same maths and the same rounding.
# pylint: disable=protected-access
_check_inputs = contrastive._check_inputs
_chunk_rows = contrastive._chunk_rows
_chunking = contrastive._chunking
_diagonal_logits = contrastive._diagonal_logits
_is_diagonal = contrastive._is_diagonal
_matmul = contrastive._matmul
_pair_labels = contrastive._pair_labels
_pairwise_logits = contrastive._pairwise_logits
_split_rows = contrastive._split_rows
_to_f32 = contrastive._to_f32
# pylint: enable=protected-access


def _axes_tuple(axes: AxisNames):
  return (axes,) if isinstance(axes, str) else tuple(axes)


def num_shards(mesh, axes: AxisNames) -> int:
  """P: the number of row blocks, the product of the sizes of `axes` in `mesh` (1 for no axes)."""
  size = 1
  for axis in _axes_tuple(axes):
    size *= mesh.shape[axis]
  return size


def _local_chunks(x_p, chunk, offset):
  """Own rows (n, d) -> (num_chunks, c, d) chunks (zero-padded), (num_chunks, c) global row
  indices and validity (local index < n)."""
  n = x_p.shape[0]
  chunk, num_chunks = _chunking(n, chunk)
  rows, valid = _chunk_rows(n, chunk, num_chunks)
  return (_split_rows(x_p, chunk, num_chunks),
          rows + offset, valid)


def _offset(axes, n):
  """Global index of this device's first row: its block index along `axes` times n."""
  return jax.lax.axis_index(axes) * n


def _gather(y_p, axes):
  """(n, d) own rows -> (N, d) all rows, in block order."""
  return jax.lax.all_gather(y_p, axes, axis=0, tiled=True)


def _check(image_emb, text_emb, mesh, axes, chunk_size, precision):
  """Validates the arguments; -> (axes as a tuple, chunk_size as an int)."""
  axes = _axes_tuple(axes)
  _check_inputs(image_emb, text_emb)
  shards = num_shards(mesh, axes)
  if image_emb.shape[0] % shards:
    raise ValueError(f'N={image_emb.shape[0]} rows are not divisible by the {shards} devices of '
                     f'mesh axes {axes}.')
  contrastive.precision_of(precision)
  if int(chunk_size) < 1:
    raise ValueError(f'chunk_size={chunk_size}: the sharded loss needs c >= 1.')
  return axes, int(chunk_size)


# ----------------------------------------------------------------------------------------------
# Softmax (InfoNCE).
# ----------------------------------------------------------------------------------------------


def _softmax_fwd_local(x_p, y_p, t, *, axes, chunk, precision):
  """Per device: -> (loss (), row_lse_p (n,), col_lse (N,) replicated)."""
  x_p, y_p, t = _to_f32(x_p, y_p, t)
  n = x_p.shape[0]
  y_all = _gather(y_p, axes)
  n_global = y_all.shape[0]
  xs, _, valid = _local_chunks(x_p, chunk, _offset(axes, n))

  def step(carry, inputs):
    col_max, col_sum = carry   # Online log-sum-exp over this device's rows, per column.
    x_k, valid_k = inputs
    logits = _pairwise_logits(x_k, y_all, t, precision)  # (c, N)
    row_lse = jax.nn.logsumexp(logits, axis=1)
    masked = jnp.where(valid_k[:, None], logits, -jnp.inf)
    new_max = jnp.maximum(col_max, jnp.max(masked, axis=0))   # Finite: a chunk has a valid row.
    col_sum = (col_sum * jnp.exp(col_max - new_max)
               + jnp.sum(jnp.exp(masked - new_max[None, :]), axis=0))
    return (new_max, col_sum), row_lse

  init = (jnp.full((n_global,), -jnp.inf, jnp.float32), jnp.zeros((n_global,), jnp.float32))
  (col_max, col_sum), row_lse = jax.lax.scan(step, init, (xs, valid))
  row_lse = row_lse.reshape(-1)[:n]
  partial_lse = col_max + jnp.log(col_sum)   # (N,) over this device's n images.
  top = jax.lax.pmax(partial_lse, axes)
  col_lse = top + jnp.log(jax.lax.psum(jnp.exp(partial_lse - top), axes))
  diag = _diagonal_logits(x_p, y_p, t)
  local = jnp.sum(row_lse) - 2 * jnp.sum(diag)
  loss = (jax.lax.psum(local, axes) + jnp.sum(col_lse)) / (2 * n_global)
  return loss, row_lse, col_lse


def _softmax_bwd_local(x_p, y_p, t, row_lse, col_lse, g, *, axes, chunk, precision):
  """Per device: -> (d x_p (n, d), d y_p (n, d), d t ())."""
  in_dtypes = (x_p.dtype, y_p.dtype, t.dtype)
  x_p, y_p, t = _to_f32(x_p, y_p, t)
  n = x_p.shape[0]
  y_all = _gather(y_p, axes)
  n_global = y_all.shape[0]
  xs, rows, valid = _local_chunks(x_p, chunk, _offset(axes, n))
  lse = _split_rows(row_lse, xs.shape[1], xs.shape[0])
  scale = g.astype(jnp.float32) / (2 * n_global)

  def step(carry, inputs):
    d_y, d_t = carry
    x_k, lse_k, rows_k, valid_k = inputs
    logits = _pairwise_logits(x_k, y_all, t, precision)  # (c, N)
    d_logits = (jnp.exp(logits - lse_k[:, None]) + jnp.exp(logits - col_lse[None, :])
                - 2 * _is_diagonal(rows_k, n_global))
    d_logits = jnp.where(valid_k[:, None], d_logits * scale, 0.)
    d_x_k = _matmul(d_logits, y_all, precision) / t
    d_y = d_y + _matmul(d_logits.T, x_k, precision) / t
    d_t = d_t - jnp.sum(d_logits * logits) / t
    return (d_y, d_t), d_x_k

  init = (jnp.zeros_like(y_all), jnp.zeros((), jnp.float32))
  (d_y_all, d_t), d_x = jax.lax.scan(step, init, (xs, lse, rows, valid))
  d_x = d_x.reshape(-1, x_p.shape[1])[:n]
  d_y = jax.lax.psum_scatter(d_y_all, axes, scatter_dimension=0, tiled=True)
  d_t = jax.lax.psum(d_t, axes)
  return tuple(v.astype(dt) for v, dt in zip((d_x, d_y, d_t), in_dtypes))


@functools.lru_cache(maxsize=None)
def _softmax_fn(mesh, axes, chunk, precision):
  """The custom_vjp loss (x, y, t) -> () for one (mesh, axes, chunk, precision)."""
  rows = P(axes)
  kw = dict(axes=axes, chunk=chunk, precision=precision)
  fwd_local = jax.shard_map(functools.partial(_softmax_fwd_local, **kw), mesh=mesh, check_vma=False,
                            in_specs=(rows, rows, P()), out_specs=(P(), rows, P()))
  bwd_local = jax.shard_map(functools.partial(_softmax_bwd_local, **kw), mesh=mesh, check_vma=False,
                            in_specs=(rows, rows, P(), rows, P(), P()),
                            out_specs=(rows, rows, P()))

  @jax.custom_vjp
  def loss_fn(x, y, t):
    return fwd_local(x, y, t)[0]

  def fwd(x, y, t):
    loss, row_lse, col_lse = fwd_local(x, y, t)
    return loss, (x, y, t, row_lse, col_lse)

  def bwd(residuals, g):
    return bwd_local(*residuals, g)

  loss_fn.defvjp(fwd, bwd)
  return loss_fn


def softmax_loss(image_emb: jax.Array, text_emb: jax.Array, temperature, *, mesh,
                 axes: AxisNames = 'data', chunk_size: int, precision: str = 'highest'):
  """`basic.contrastive.softmax_loss` with the batch axis sharded over `axes` of `mesh`.

  Args:
    image_emb: (N, d) image embeddings (any sharding; resharded to PartitionSpec(axes), which is
      free when they are already split over `axes` or replicated along part of them).
    text_emb: (N, d) text embeddings; row i matches image row i.
    temperature: () positive scalar.
    mesh: a jax.sharding.Mesh (or AbstractMesh) holding `axes`.
    axes: the mesh axes the rows are split over (P = the product of their sizes must divide N).
    chunk_size: c > 0 rows per logit block on each device (need not divide N / P); the block is
      c x N. Use N / P for one block per device.
    precision: 'highest' | 'high' | 'default' (basic.contrastive.PRECISIONS).

  Returns:
    () float32 loss, replicated; gradients come back with the embeddings' rows split over `axes`.
  """
  axes, chunk = _check(image_emb, text_emb, mesh, axes, chunk_size, precision)
  fn = _softmax_fn(mesh, axes, chunk, precision)
  return fn(image_emb, text_emb, jnp.asarray(temperature))


# ----------------------------------------------------------------------------------------------
# Sigmoid (SigLIP).
# ----------------------------------------------------------------------------------------------


def _sigmoid_fwd_local(x_p, y_p, t, b, *, axes, chunk, precision):
  """Per device: -> loss () replicated."""
  x_p, y_p, t, b = _to_f32(x_p, y_p, t, b)
  n = x_p.shape[0]
  y_all = _gather(y_p, axes)
  n_global = y_all.shape[0]
  xs, rows, valid = _local_chunks(x_p, chunk, _offset(axes, n))

  def chunk_sum(inputs):
    x_k, rows_k, valid_k = inputs
    logits = _pairwise_logits(x_k, y_all, t, precision) + b
    terms = jax.nn.log_sigmoid(_pair_labels(rows_k, n_global) * logits)
    return jnp.sum(jnp.where(valid_k[:, None], terms, 0.))

  local = jnp.sum(jax.lax.map(chunk_sum, (xs, rows, valid)))
  return -jax.lax.psum(local, axes) / n_global


def _sigmoid_bwd_local(x_p, y_p, t, b, g, *, axes, chunk, precision):
  """Per device: -> (d x_p, d y_p, d t, d b)."""
  in_dtypes = (x_p.dtype, y_p.dtype, t.dtype, b.dtype)
  x_p, y_p, t, b = _to_f32(x_p, y_p, t, b)
  n = x_p.shape[0]
  y_all = _gather(y_p, axes)
  n_global = y_all.shape[0]
  xs, rows, valid = _local_chunks(x_p, chunk, _offset(axes, n))
  scale = g.astype(jnp.float32) / n_global

  def step(carry, inputs):
    d_y, d_t, d_b = carry
    x_k, rows_k, valid_k = inputs
    logits = _pairwise_logits(x_k, y_all, t, precision)
    labels = _pair_labels(rows_k, n_global)
    d_logits = -labels * jax.nn.sigmoid(-labels * (logits + b))
    d_logits = jnp.where(valid_k[:, None], d_logits * scale, 0.)
    d_x_k = _matmul(d_logits, y_all, precision) / t
    d_y = d_y + _matmul(d_logits.T, x_k, precision) / t
    d_t = d_t - jnp.sum(d_logits * logits) / t
    d_b = d_b + jnp.sum(d_logits)
    return (d_y, d_t, d_b), d_x_k

  zero = jnp.zeros((), jnp.float32)
  (d_y_all, d_t, d_b), d_x = jax.lax.scan(step, (jnp.zeros_like(y_all), zero, zero),
                                          (xs, rows, valid))
  d_x = d_x.reshape(-1, x_p.shape[1])[:n]
  d_y = jax.lax.psum_scatter(d_y_all, axes, scatter_dimension=0, tiled=True)
  d_t, d_b = jax.lax.psum((d_t, d_b), axes)
  return tuple(v.astype(dt) for v, dt in zip((d_x, d_y, d_t, d_b), in_dtypes))


@functools.lru_cache(maxsize=None)
def _sigmoid_fn(mesh, axes, chunk, precision):
  """The custom_vjp loss (x, y, t, b) -> () for one (mesh, axes, chunk, precision)."""
  rows = P(axes)
  kw = dict(axes=axes, chunk=chunk, precision=precision)
  fwd_local = jax.shard_map(functools.partial(_sigmoid_fwd_local, **kw), mesh=mesh, check_vma=False,
                            in_specs=(rows, rows, P(), P()), out_specs=P())
  bwd_local = jax.shard_map(functools.partial(_sigmoid_bwd_local, **kw), mesh=mesh, check_vma=False,
                            in_specs=(rows, rows, P(), P(), P()),
                            out_specs=(rows, rows, P(), P()))

  @jax.custom_vjp
  def loss_fn(x, y, t, b):
    return fwd_local(x, y, t, b)

  def fwd(x, y, t, b):
    return fwd_local(x, y, t, b), (x, y, t, b)

  def bwd(residuals, g):
    return bwd_local(*residuals, g)

  loss_fn.defvjp(fwd, bwd)
  return loss_fn


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, temperature, bias, *, mesh,
                 axes: AxisNames = 'data', chunk_size: int, precision: str = 'highest'):
  """`basic.contrastive.sigmoid_loss` with the batch axis sharded over `axes` of `mesh`.

  Arguments as `softmax_loss` (this module), plus `bias`, the () logit bias.
  """
  axes, chunk = _check(image_emb, text_emb, mesh, axes, chunk_size, precision)
  fn = _sigmoid_fn(mesh, axes, chunk, precision)
  return fn(image_emb, text_emb, jnp.asarray(temperature), jnp.asarray(bias))
