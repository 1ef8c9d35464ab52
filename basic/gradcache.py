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


def _flags(treedef, frozen):
  return [False] * treedef.num_leaves if frozen is None else treedef.flatten_up_to(frozen)


def split_frozen(params: PyTree, frozen: PyTree):
  """-> (the leaves of `params` to differentiate (a list), merge), `frozen` a tree of bools
  like `params` (True: the leaf is a constant). merge(leaves) rebuilds the whole tree from the
  differentiated leaves and the constants, so that jax.vjp / jax.grad over `leaves` neither
  differentiates the frozen leaves nor runs the backward of what depends on them alone."""
  leaves, treedef = jax.tree.flatten(params)
  flags = _flags(treedef, frozen)
  constants = [x for x, f in zip(leaves, flags) if f]

  def merge(trained):
    trained, fixed = iter(trained), iter(constants)
    return treedef.unflatten([next(fixed) if f else next(trained) for f in flags])
  return [x for x, f in zip(leaves, flags) if not f], merge


def _with_zeros(params, frozen, trained_grads):
  """The whole gradient tree: `trained_grads` (a list, as split_frozen) and zeros at the
  frozen leaves."""
  leaves, treedef = jax.tree.flatten(params)
  flags = _flags(treedef, frozen)
  grads = iter(trained_grads)
  return treedef.unflatten([jnp.zeros(x.shape, x.dtype) if f else next(grads)
                            for x, f in zip(leaves, flags)])


def _plain_value_and_grad(encode_fn, loss_fn, frozen):
  """K = 1: the whole batch is one microbatch, plain autodiff is the same. Frozen leaves are
  constants (a locked tower runs its forward only)."""

  def f(params, batch, rng):
    trained, merge = split_frozen(params, frozen)

    def loss(leaves):
      p = merge(leaves)
      return loss_fn(p, *encode_fn(p, batch, microbatch_rng(rng, 0)))

    value, grads = jax.value_and_grad(loss)(trained)
    return value, _with_zeros(params, frozen, grads)

  return f


def value_and_grad(encode_fn: EncodeFn, loss_fn: LossFn, *,
                   num_microbatches: int, unroll: int = 1, frozen: PyTree = None,
                   locked: Tuple[str, ...] = (), encode_side=None):
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
    frozen: None (every parameter is differentiated) or a tree of Python bools like params:
      True for a leaf that is a constant (basic.freeze: frozen parameters). Its gradient is
      returned as zeros, and it is never differentiated: the vjp of step 3 is over the other
      leaves only (`split_frozen`).
    locked: the sides ('image', 'text') whose embeddings depend on frozen leaves only (a
      locked tower, projection included). Such a side is embedded once, in step 1; step 2 takes
      no cotangent for it and step 3 recomputes the other side alone (nothing at all when both
      are locked). So a locked tower costs one forward pass per example.
    encode_side: (params, microbatch, rng, side) -> that side's embeddings (m, d), equal to
      the matching output of encode_fn; needed when exactly one side is locked.

  Returns:
    A function (params, batch, rng) -> (loss (), grads like params). For K = 1
    it is plain `jax.value_and_grad` (identical math, no recomputation).
  """
  if num_microbatches < 1:
    raise ValueError(f'num_microbatches must be >= 1, got {num_microbatches}.')
  locked = tuple(locked)
  if any(side not in ('image', 'text') for side in locked):
    raise ValueError(f"locked={locked}: the sides are 'image' and 'text'.")
  if locked and frozen is None:
    raise ValueError(f'locked={locked} needs the frozen leaves (frozen=...).')
  if len(locked) == 1 and encode_side is None:
    raise ValueError(f'locked={locked}: recomputing one side needs encode_side.')
  if num_microbatches == 1:
    return _plain_value_and_grad(encode_fn, loss_fn, frozen)
  if locked:
    return _locked_value_and_grad(encode_fn, loss_fn, num_microbatches, unroll, frozen, locked,
                                  encode_side)

  def f(params, batch, rng):
    microbatches = microbatch(batch, num_microbatches)
    ks = jnp.arange(num_microbatches)

    # 1. Embed every microbatch, no tape.
    constant = jax.lax.stop_gradient(params)

    # The parameters ride in the loop carry behind an optimization barrier, so they are not
    # loop-invariant: otherwise XLA hoists the FSDP all-gathers out of the loops and every
    # device holds the whole gathered model for the entire step (BENCHMARKS.md, CLIPA plan:
    # 11.89 -> 9.03 GiB/device). Identity on the values.
    def embed(carry, xs):
      k, mb = xs
      p = jax.lax.optimization_barrier(carry)
      return p, encode_fn(p, mb, microbatch_rng(rng, k))

    _, (image_emb, text_emb) = jax.lax.scan(
        embed, constant, (ks, microbatches), unroll=unroll)  # (K, m, d) each.

    # 2. Loss, direct parameter gradients and embedding cotangents.
    loss, (direct, d_image, d_text) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2))(params, unmicrobatch(image_emb),
                                    unmicrobatch(text_emb))
    d_image = microbatch(d_image, num_microbatches)  # (K, m, d)
    d_text = microbatch(d_text, num_microbatches)

    # 3. Recompute each microbatch under vjp and pull back its cotangents (over the trained
    # leaves; frozen leaves are constants).
    def pull(p, k, mb, cotangents):
      trained, merge = split_frozen(p, frozen)
      _, pullback = jax.vjp(
          lambda q: encode_fn(merge(q), mb, microbatch_rng(rng, k)), trained)
      (grads_k,) = pullback(cotangents)
      return grads_k

    acc = _accumulate(pull, params, frozen, (ks, microbatches, (d_image, d_text)), unroll)
    return loss, _add_direct(params, frozen, acc, direct)

  return f


def _accumulate(pull, params, frozen, xs, unroll):
  """Step 3's loop: sum over microbatches of pull(p, k, microbatch, cotangents) (a list of
  the trained leaves' gradients, as split_frozen), in float32."""
  trained, _ = split_frozen(params, frozen)

  def backprop(carry, xs):
    acc, p = carry
    k, mb, cotangents = xs
    p = jax.lax.optimization_barrier(p)
    grads_k = pull(p, k, mb, cotangents)
    acc = [a + g.astype(jnp.float32) for a, g in zip(acc, grads_k)]
    return (acc, p), None

  zeros = [jnp.zeros(x.shape, jnp.float32) for x in trained]
  (acc, _), _ = jax.lax.scan(backprop, (zeros, params), xs, unroll=unroll)
  return acc


def _add_direct(params, frozen, acc, direct):
  """4. Encoder gradients (the trained leaves, a list) plus the loss's direct gradients, in
  the parameters' dtypes; zeros at the frozen leaves."""
  trained, _ = split_frozen(params, frozen)
  direct, _ = split_frozen(direct, frozen)
  return _with_zeros(params, frozen, [
      (a + d.astype(jnp.float32)).astype(x.dtype) for a, d, x in zip(acc, direct, trained)])


def _locked_value_and_grad(encode_fn, loss_fn, num_microbatches, unroll, frozen, locked,
                           encode_side):
  """value_and_grad with locked sides: step 1 embeds both sides once (no tape), step 2 takes
  the cotangents of the unlocked side only, step 3 recomputes the unlocked side alone under vjp
  (skipped when both sides are locked)."""
  sides = ('image', 'text')
  free = [i for i, side in enumerate(sides) if side not in locked]

  def f(params, batch, rng):
    microbatches = microbatch(batch, num_microbatches)
    ks = jnp.arange(num_microbatches)

    def embed(carry, xs):
      k, mb = xs
      p = jax.lax.optimization_barrier(carry)
      return p, encode_fn(p, mb, microbatch_rng(rng, k))

    _, embeddings = jax.lax.scan(
        embed, jax.lax.stop_gradient(params), (ks, microbatches), unroll=unroll)
    embeddings = [jax.lax.stop_gradient(unmicrobatch(z)) for z in embeddings]

    # 2. The loss, its direct gradients and the unlocked side's cotangents.
    def loss_of(p, *free_embeddings):
      z = list(embeddings)
      for i, e in zip(free, free_embeddings):
        z[i] = e
      return loss_fn(p, *z)

    loss, (direct, *cotangents) = jax.value_and_grad(
        loss_of, argnums=tuple(range(1 + len(free))))(params, *[embeddings[i] for i in free])
    if not free:
      return loss, _add_direct(params, frozen, [0.0] * len(split_frozen(params, frozen)[0]),
                               direct)
    (side,) = [sides[i] for i in free]
    cotangent = microbatch(cotangents[0], num_microbatches)   # (K, m, d)

    # 3. Recompute the unlocked side of each microbatch under vjp over the trained leaves.
    def pull(p, k, mb, cot):
      trained, merge = split_frozen(p, frozen)
      _, pullback = jax.vjp(
          lambda q: encode_side(merge(q), mb, microbatch_rng(rng, k), side), trained)
      (grads_k,) = pullback(cot)
      return grads_k

    acc = _accumulate(pull, params, frozen, (ks, microbatches, cotangent), unroll)
    return loss, _add_direct(params, frozen, acc, direct)

  return f
