"""Exact online gradient caching for contrastive dual encoders.

A contrastive loss couples every example of the batch, so the batch cannot be
split into independent microbatches the way a classification loss can. Gradient
caching (Gao et al., 2021; the BASIC paper's large-batch trick) splits the
computation instead. With N pairs in K microbatches of m = N / K pairs:

1. Embed: for k in 0..K-1 (`lax.scan`, no gradient tape), encode microbatch k
   with rng `microbatch_rng(rng, k)`; this gives the (N, d) image and text
   embeddings.
2. Loss: `jax.value_and_grad(loss_fn)` over (params, image_emb, text_emb)
   gives the loss, the direct parameter gradients (e.g. the temperature) and
   the embedding cotangents dL/dimage_emb, dL/dtext_emb, each (N, d).
3. Backprop: for each k (`lax.scan`), recompute the encoder on microbatch k
   with the same rng under `jax.vjp` and pull back the k-th slices of the
   cotangents; accumulate the parameter gradients in float32.
4. grads = accumulated + direct.

Because step 3 reuses the rngs of step 1, dropout, stochastic depth and token
masking draw the same masks twice and the result equals `jax.value_and_grad`
of the full-batch loss over `encode_full_batch` (to float32 rounding). Layers
with batch statistics (BatchNorm) would see microbatch statistics, in both
this function and the reference; prefer layers without batch statistics.

Memory. The peak is the runtime, plus the input batch (N examples, kept in
their storage dtype, e.g. uint8 images and int32 tokens, since it is read in
step 1 and again in step 3), plus the embeddings and their cotangents (about
16*N*d bytes in float32), plus whatever the loss needs (O(c*N) for a chunked
loss from `basic.contrastive`, about 3*4*c*N bytes), plus the activations of
ONE microbatch of m examples. Nothing is N x N and no activations of the full
batch exist. With FSDP-sharded parameters, each microbatch gathers the weights
it needs again (the loops keep the parameters out of loop-invariant hoisting).
The cost is one extra forward pass: about 4/3 of a plain step.

Microbatch layout. Microbatch k is the strided set of examples
{i : i % K == k}, i.e. `x.reshape(m, K, ...).swapaxes(0, 1)`. When the batch
axis N is sharded in contiguous blocks over data-parallel devices (each block a
multiple of K), every microbatch is spread evenly over all devices and the
reshape needs no communication.
"""

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

PyTree = Any
EncodeFn = Callable[[PyTree, PyTree, jax.Array], Tuple[jax.Array, jax.Array]]
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def _split(x: jax.Array, num_microbatches: int) -> jax.Array:
  batch_size = x.shape[0]
  if num_microbatches < 1 or batch_size % num_microbatches:
    raise ValueError(
        f'batch_size={batch_size} is not divisible by '
        f'num_microbatches={num_microbatches}: microbatch_size would be '
        f'{batch_size / num_microbatches}.')
  microbatch_size = batch_size // num_microbatches
  return x.reshape(microbatch_size, num_microbatches,
                   *x.shape[1:]).swapaxes(0, 1)


def microbatch(batch: PyTree, num_microbatches: int) -> PyTree:
  """Splits every (N, ...) leaf into (K, m, ...) strided microbatches.

  Microbatch k holds examples {i : i % K == k} in order: out[k, j] = x[j*K + k].
  With N sharded in contiguous blocks over devices, each microbatch then has
  an equal share on every device and the reshape is device-local.

  Args:
    batch: pytree whose leaves all have leading dimension N.
    num_microbatches: K, must divide N.

  Returns:
    The same pytree with leaves of shape (K, N // K, ...).

  Raises:
    ValueError: if N % K != 0.
  """
  return jax.tree.map(lambda x: _split(x, num_microbatches), batch)


def unmicrobatch(x: PyTree) -> PyTree:
  """Inverse of `microbatch`: (K, m, ...) leaves back to (K*m, ...)."""

  def merge(leaf):
    k, m = leaf.shape[:2]
    return leaf.swapaxes(0, 1).reshape(k * m, *leaf.shape[2:])

  return jax.tree.map(merge, x)


def microbatch_rng(rng: jax.Array, k) -> jax.Array:
  """The rng of microbatch k: `jax.random.fold_in(rng, k)`."""
  return jax.random.fold_in(rng, k)


def encode_full_batch(encode_fn: EncodeFn, params: PyTree, batch: PyTree,
                      rng: jax.Array,
                      num_microbatches: int) -> Tuple[jax.Array, jax.Array]:
  """Differentiable reference: embeds all microbatches, keeping every tape.

  Args:
    encode_fn: (params, microbatch, rng) -> (image_emb (m, d), text_emb (m, d)).
    params: encoder (and loss) parameters.
    batch: pytree with leaves of leading dimension N.
    rng: step rng; microbatch k uses `microbatch_rng(rng, k)`.
    num_microbatches: K, must divide N.

  Returns:
    (image_emb, text_emb), each (N, d), rows in the order of `batch`.
  """
  microbatches = microbatch(batch, num_microbatches)
  outputs = []
  for k in range(num_microbatches):
    mb = jax.tree.map(lambda x, k=k: x[k], microbatches)
    outputs.append(encode_fn(params, mb, microbatch_rng(rng, k)))
  image_emb, text_emb = (jnp.stack(z) for z in zip(*outputs))
  return unmicrobatch(image_emb), unmicrobatch(text_emb)


def _plain_value_and_grad(encode_fn, loss_fn):
  """K = 1: the whole batch is one microbatch, plain autodiff is the same."""

  def f(params, batch, rng):
    def loss(p):
      return loss_fn(p, *encode_fn(p, batch, microbatch_rng(rng, 0)))

    return jax.value_and_grad(loss)(params)

  return f


def value_and_grad(encode_fn: EncodeFn, loss_fn: LossFn, *,
                   num_microbatches: int, unroll: int = 1):
  """Builds the gradient-cached `(params, batch, rng) -> (loss, grads)`.

  Equal (to float32 rounding) to
  `jax.value_and_grad(lambda p: loss_fn(p, *encode_full_batch(
  encode_fn, p, batch, rng, num_microbatches)))(params)`, while holding the
  activations of only one microbatch at a time (see the module docstring).

  Args:
    encode_fn: (params, microbatch, rng) -> (image_emb (m, d), text_emb (m, d)).
      Must be a pure function of its arguments (same rng, same output).
    loss_fn: (params, image_emb (N, d), text_emb (N, d)) -> () loss; may read
      parameters such as the temperature.
    num_microbatches: K; the batch size N of each call must be a multiple.
    unroll: microbatches per loop iteration of steps 1 and 3 (`lax.scan`'s unroll; K or
      True = fully unrolled). Same result. On XLA:CPU a loop body runs far slower than the same
      ops outside a loop (measured in BENCHMARKS.md), so small K is best unrolled there; on
      accelerators keep 1: each unrolled microbatch may hold its activations at once.

  Returns:
    A function (params, batch, rng) -> (loss (), grads like params). For K = 1
    it is plain `jax.value_and_grad` (identical math, no recomputation).
  """
  if num_microbatches < 1:
    raise ValueError(f'num_microbatches must be >= 1, got {num_microbatches}.')
  if num_microbatches == 1:
    return _plain_value_and_grad(encode_fn, loss_fn)

  def f(params, batch, rng):
    microbatches = microbatch(batch, num_microbatches)
    ks = jnp.arange(num_microbatches)

    # 1. Embed every microbatch, no tape.
    frozen = jax.lax.stop_gradient(params)

    # The parameters ride in the loop carry behind an optimization barrier, so they are not
    # loop-invariant: otherwise XLA hoists the FSDP all-gathers out of the loops and every
    # device holds the whole gathered model for the entire step (BENCHMARKS.md, CLIPA plan:
    # 11.89 -> 9.03 GiB/device). Identity on the values.
    def embed(carry, xs):
      k, mb = xs
      p = jax.lax.optimization_barrier(carry)
      return p, encode_fn(p, mb, microbatch_rng(rng, k))

    _, (image_emb, text_emb) = jax.lax.scan(
        embed, frozen, (ks, microbatches), unroll=unroll)  # (K, m, d) each.

    # 2. Loss, direct parameter gradients and embedding cotangents.
    loss, (direct, d_image, d_text) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2))(params, unmicrobatch(image_emb),
                                    unmicrobatch(text_emb))
    d_image = microbatch(d_image, num_microbatches)  # (K, m, d)
    d_text = microbatch(d_text, num_microbatches)

    # 3. Recompute each microbatch under vjp and pull back its cotangents.
    def backprop(carry, xs):
      acc, p = carry
      k, mb, d_image_k, d_text_k = xs
      p = jax.lax.optimization_barrier(p)
      _, pullback = jax.vjp(
          lambda q: encode_fn(q, mb, microbatch_rng(rng, k)), p)
      (grads_k,) = pullback((d_image_k, d_text_k))
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads_k)
      return (acc, p), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (acc, _), _ = jax.lax.scan(backprop, (zeros, params),
                               (ks, microbatches, d_image, d_text), unroll=unroll)

    # 4. Encoder gradients plus the loss's direct gradients.
    grads = jax.tree.map(
        lambda a, d, p: (a + d.astype(jnp.float32)).astype(p.dtype),
        acc, direct, params)
    return loss, grads

  return f
