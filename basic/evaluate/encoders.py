"""The towers of a dual encoder, jitted over a device mesh for evaluation.

Evaluation batches are global, like training batches: each host passes its own rows (its share
of the data, `local_batch` rows, padded), the batch is sharded over the mesh's 'data' axis, and
results come back replicated, so every host holds the embeddings of the whole global batch in
host order (host 0's rows, then host 1's, ...). Values that identify rows (labels, ids, validity)
travel the same way (`gather`), so hosts never need to know each other's data.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from basic import sharding


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  """x [n, ...] -> [rows, ...], zero rows appended (n <= rows)."""
  x = np.asarray(x)
  if len(x) > rows:
    raise ValueError(f'{len(x)} rows do not fit a local batch of {rows}.')
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


class Encoders:
  """Jitted image / text towers of `model` for global batches of `batch_size` rows.

  Compiled once per input shape and reused across calls (keep one instance per run).

  Attributes:
    mesh: the device mesh; batches are sharded over its 'data' axis.
    batch_size: B, rows of a global batch (divisible by the hosts and the 'data' axis size).
    local_batch: B / process_count, the rows each host passes.
  """

  def __init__(self, model, mesh, batch_size: int):
    count = jax.process_count()
    data_size = mesh.shape[sharding.DATA_AXIS]
    if batch_size % count or batch_size % data_size:
      raise ValueError(f'Evaluation batch size {batch_size} is not divisible by the number of '
                       f'processes ({count}) and the data-parallel devices ({data_size}).')
    self.model, self.mesh, self.batch_size = model, mesh, batch_size
    self.compiled = {}   # Evaluators' jitted functions for this model and batch, by their keys.
    self.local_batch = batch_size // count
    self.replicated = sharding.replicated(mesh)
    self._batch = sharding.batch_sharding(mesh)

    def image_fn(params, images):
      return model.apply({'params': params}, images, method='encode_image').astype(jnp.float32)

    def text_fn(params, tokens):
      return model.apply({'params': params}, tokens, method='encode_text').astype(jnp.float32)
    self._image_fn = self.jit(image_fn)
    self._text_fn = self.jit(text_fn)
    self._identity = self.jit(lambda x: x)

  def jit(self, fn: Callable) -> Callable:
    """jax.jit with replicated outputs (inputs keep the shardings they come with)."""
    return jax.jit(fn, out_shardings=self.replicated)

  def put(self, local) -> jax.Array:
    """This host's rows [n <= local_batch, ...] -> the global batch [B, ...] over 'data'."""
    return jax.make_array_from_process_local_data(self._batch, _pad(local, self.local_batch))

  def replicate(self, value: np.ndarray) -> jax.Array:
    """An array with the same value on every host -> a jax.Array replicated over the mesh."""
    return sharding.put_whole(value, self.replicated)

  def gather(self, local) -> np.ndarray:
    """This host's rows [n <= local_batch, ...] -> every host's rows [B, ...] (zero-padded)."""
    return np.asarray(self._identity(self.put(local)))

  def images(self, params, local_images) -> np.ndarray:
    """uint8 [n <= local_batch, S, S, 3] of this host -> float32 [B, d] of the global batch."""
    return np.asarray(self._image_fn(params, self.put(local_images)))

  def texts(self, params, local_tokens) -> np.ndarray:
    """int32 [n <= local_batch, L] of this host -> float32 [B, d] of the global batch."""
    return np.asarray(self._text_fn(params, self.put(local_tokens)))

  def _same(self, encode: Callable, params, rows) -> np.ndarray:
    """`encode` (self.images or self.texts) of rows that are the same on every host; each
    global batch is split between the hosts, so every host encodes only its share."""
    rows = np.asarray(rows)
    index = jax.process_index()
    outs = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      mine = chunk[index * self.local_batch:(index + 1) * self.local_batch]
      outs.append(encode(params, mine)[:len(chunk)])
    if not outs:
      return np.zeros((0, self.model.config.model.embed_dim), np.float32)
    return np.concatenate(outs)

  def same_texts(self, params, tokens) -> np.ndarray:
    """int32 [n, L], the same on every host (prompts) -> float32 [n, d] unit vectors."""
    return self._same(self.texts, params, tokens)

  def same_images(self, params, images) -> np.ndarray:
    """uint8 [n, S, S, 3], the same on every host -> float32 [n, d] unit vectors."""
    return self._same(self.images, params, images)
