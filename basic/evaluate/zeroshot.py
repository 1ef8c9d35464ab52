"""Zero-shot classification: class names x prompt templates -> text classifier.

Per class, the template embeddings are averaged and re-normalised (CLIP's prompt ensembling);
images are classified by cosine similarity against all classes.
"""
from typing import Callable, Sequence

import jax
import numpy as np


def _batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies fn to fixed-size batches (the last one padded) so fn compiles once."""
  outs = []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outs)


def class_embeddings(encode_text: Callable, tokenize: Callable, class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int) -> np.ndarray:
  """-> [num_classes, d] float32 unit vectors.

  encode_text: int32 [B, L] -> [B, d] unit vectors; tokenize: list[str] -> int32 [n, L].
  """
  prompts = [t.format(c) for c in class_names for t in templates]
  emb = _batched(encode_text, tokenize(prompts), batch_size)
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def encode_images(encode_image: Callable, images: np.ndarray, batch_size: int) -> np.ndarray:
  """[n, H, W, 3] -> [n, d]."""
  return _batched(encode_image, images, batch_size)


def topk_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict:
  """Fraction of images whose label is among the k most similar classes, for each k."""
  logits = image_emb @ class_emb.T                                  # [n, C]
  ranked = np.argsort(-logits, axis=1)
  return {k: float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1))) for k in ks}


def evaluate(model, params, tokenizer, data: dict, batch_size: int) -> dict:
  """Zero-shot top-1/top-5 of `model` on `data` (images, labels, class_names, templates)."""
  image_fn = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_image'))
  text_fn = jax.jit(lambda p, t: model.apply({'params': p}, t, method='encode_text'))
  encode_image = lambda x: image_fn(params, x)
  encode_text = lambda t: text_fn(params, t)
  classes = class_embeddings(encode_text, tokenizer.encode, data['class_names'],
                             data['templates'], batch_size)
  images = encode_images(encode_image, data['images'], batch_size)
  acc = topk_accuracy(images, classes, np.asarray(data['labels']), ks=(1, 5))
  return {'zeroshot/top1': acc[1], 'zeroshot/top5': acc[5],
          'zeroshot/num_classes': float(len(data['class_names'])),
          'zeroshot/num_images': float(len(data['labels']))}
