"""The ranking rules every evaluator (and `basic.inference`) shares: top-k correctness with one
tie rule, and prompt-ensembled class embeddings.

Top-k rule: an image is correct at k if fewer than k other allowed classes rank above its label,
where class c ranks above the label if its logit is larger, or equal with c < label (ties go to
the lower class index, as numpy.argmax and CLIP's argmax evaluation resolve them; it matters
for duplicate names, e.g. ImageNet's two "missile" and two "sunglasses" classes). With `allowed`
(a class subset, e.g. ImageNet-A / -R), only those classes may be predicted (the other logits
are masked out), and an image whose label is outside it counts as wrong.

Retrieval (basic/evaluate/retrieval.py) ranks a query among several positives with its own,
stricter rule: ties count against the query (see its docstring).
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def topk_hits(logits, labels, allowed=None, ks: Sequence[int] = (1, 5)) -> dict:
  """Top-k correctness under the rule above (jax.numpy or numpy arrays).

  Args:
    logits: float [n, C].
    labels: int [n], in [0, C).
    allowed: bool [C], the classes that may be predicted (None: all).
    ks: the k values.

  Returns:
    {k: bool [n]}.
  """
  xp = jnp if isinstance(logits, jax.Array) else np
  if allowed is None:
    allowed = xp.ones(logits.shape[1], bool)
  index = xp.arange(logits.shape[1])[None, :]
  own = xp.take_along_axis(logits, labels[:, None], axis=1)                       # [n, 1]
  above = (logits > own) | ((logits == own) & (index < labels[:, None]))          # [n, C]
  rank = xp.sum(above & allowed[None, :], axis=1)                                 # [n]
  ok = allowed[labels]
  return {k: ok & (rank < k) for k in ks}


def topk_accuracy(logits, labels, allowed=None, ks: Sequence[int] = (1, 5)) -> dict:
  """{k: fraction of the n images correct at k} under the rule above (numpy)."""
  hits = topk_hits(np.asarray(logits), np.asarray(labels), allowed, ks)
  return {k: float(np.mean(hit)) if len(hit) else 0.0 for k, hit in hits.items()}


def class_embeddings(encode_texts: Callable[[list], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """CLIP's prompt ensembling: -> float32 [num_classes, d] unit vectors, per class the
  embeddings of its prompts (template.format(name) for every template) averaged and
  re-normalised. `encode_texts(list of str) -> [n, d]` embeds the prompts."""
  prompts = [t.format(c) for c in class_names for t in templates]
  emb = np.asarray(encode_texts(prompts))
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def allowed_classes(num_classes: int, subset: Optional[Sequence[int]] = None) -> np.ndarray:
  """bool [num_classes]: the classes of `subset` (None: every class)."""
  allowed = np.zeros(num_classes, bool)
  allowed[list(subset) if subset is not None else slice(None)] = True
  return allowed
