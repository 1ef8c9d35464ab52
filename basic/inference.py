"""Inference from a checkpoint: embeddings and zero-shot classification.

  model = basic.inference.load('gs://bucket/runs/basic_l')   # or a local workdir / step dir
  probs = model.zero_shot(images, ['a cat', 'a dog'])         # [n_images, n_labels]

`load` reads everything from the checkpoint itself (its config, tokenizer and parameters; see
basic/checkpoint.py), so the same preprocessing as in training applies: images are resized
(shorter side) and centre-cropped to config.data.image_size, then normalised on device with
config.data.mean / std; texts are tokenised with the run's tokenizer (SentencePiece, or CLIP's BPE
for converted OpenCLIP / OpenAI weights, see basic/convert/open_clip.py).
"""
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np

from basic import checkpoint as checkpoint_lib
from basic import models
from basic import tokenizer as tokenizer_lib
from basic.data import preprocess
from basic.data import synthetic
from basic.evaluate import ranking
from basic.models import temperature_from_params

# Prompt for labels when the caller gives no templates and the run's data has none of its own.
DEFAULT_TEMPLATES = ('a photo of a {}.',)


def _to_uint8_rgb(image) -> np.ndarray:
  """PIL image or array [h, w, 3] (uint8, or float in [0, 1]) -> uint8 [h, w, 3]."""
  if hasattr(image, 'convert'):        # PIL.Image
    image = image.convert('RGB')
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'Expected an image [h, w, 3], got shape {image.shape}.')
  image = image[..., :3]
  if image.dtype != np.uint8:
    if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
      image = image * 255.0
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image


class Model:
  """A trained dual encoder with its tokenizer and preprocessing.

  Attributes:
    config: the run's experiment config.
    params: the parameters (host or device arrays).
    tokenizer: `basic.tokenizer.Tokenizer` or `basic.clip_bpe.ClipBpeTokenizer`.
    step: the checkpoint step.
    batch_size: images / texts encoded per call of the compiled encoders.
  """

  def __init__(self, config, params, tokenizer, step: int = 0, batch_size: int = 64):
    self.config, self.params, self.tokenizer, self.step = config, params, tokenizer, step
    self.batch_size = batch_size
    self._model = models.build(config)
    self._image_fn = jax.jit(
        lambda p, x: self._model.apply({'params': p}, x, method='encode_image'))
    self._text_fn = jax.jit(
        lambda p, t: self._model.apply({'params': p}, t, method='encode_text'))

  @property
  def temperature(self) -> float:
    return float(temperature_from_params(self.params, self.config))

  def preprocess(self, images) -> np.ndarray:
    """Images (PIL or arrays of any size) -> uint8 [n, S, S, 3], S = config.data.image_size."""
    size = self.config.data.image_size
    method = self.config.data.resize_method
    antialias = self.config.data.antialias
    out = []
    for image in images:
      image = _to_uint8_rgb(image)
      if image.shape[:2] != (size, size):
        image = preprocess.eval_image(image, size, method=method, antialias=antialias).numpy()
      out.append(image)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)

  def _batched(self, fn, x):
    outs = []
    for i in range(0, len(x), self.batch_size):
      chunk = x[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:  # Fixed shapes: one compilation.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      outs.append(np.asarray(fn(self.params, chunk))[:len(chunk) - pad])
    return np.concatenate(outs) if outs else np.zeros((0, self.config.model.embed_dim),
                                                      np.float32)

  def encode_images(self, images) -> np.ndarray:
    """images: a list of PIL images or uint8 [h, w, 3] arrays, or an array [n, h, w, 3].
    -> float32 [n, embed_dim] unit vectors."""
    return self._batched(self._image_fn, self.preprocess(list(images)))

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """list of n str -> float32 [n, embed_dim] unit vectors."""
    return self._batched(self._text_fn, self.tokenizer.encode(list(texts)))

  def default_templates(self) -> tuple:
    if self.config.data.source == 'synthetic':
      return tuple(synthetic.ZEROSHOT_TEMPLATES)
    return DEFAULT_TEMPLATES

  def class_embeddings(self, labels: Sequence[str],
                       templates: Optional[Sequence[str]] = None) -> np.ndarray:
    """Per label, the mean of its prompt embeddings, re-normalised. -> [n_labels, embed_dim]."""
    return ranking.class_embeddings(self.encode_texts, labels,
                                    tuple(templates or self.default_templates()))

  def zero_shot(self, images, labels: Sequence[str],
                templates: Optional[Sequence[str]] = None) -> np.ndarray:
    """-> float32 [n_images, n_labels] probabilities: softmax of cosine / temperature."""
    logits = self.encode_images(images) @ self.class_embeddings(labels, templates).T
    logits = logits / self.temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def load(path: str, step: Optional[int] = None, batch_size: int = 64,
         use_ema: bool = False) -> Model:
  """Loads a checkpoint: a training workdir or checkpoints directory (its latest step, unless
  `step`), or one step directory; local or gs://. With use_ema, the model's parameters are the
  EMA of the parameters the run kept (config.ema_decay > 0; ValueError naming use_ema and
  config.ema_decay for a checkpoint without one)."""
  with checkpoint_lib.open_step(path, step) as (ckpt, step):
    config = ckpt.restore_config(step)
    model_bytes = ckpt.restore_tokenizer(step)
    if model_bytes is None:
      raise FileNotFoundError(f'Checkpoint {ckpt.directory}/{step} holds no tokenizer (written '
                              'by an older version); set config.tokenizer.model_path and retrain.')
    kind = ckpt.restore_tokenizer_kind(step)
    if kind != config.tokenizer.kind:
      raise ValueError(f'Checkpoint {ckpt.directory}/{step} holds a {kind} tokenizer, but its '
                       f'config says tokenizer.kind={config.tokenizer.kind!r}.')
    params = _restore_ema(ckpt, step, config) if use_ema else ckpt.restore_params(step)
  with tempfile.NamedTemporaryFile(suffix='-' + tokenizer_lib.MODEL_FILENAMES[kind],
                                   delete=False) as f:
    f.write(model_bytes)
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, f.name, config.data.text_length)
  return Model(config, params, tokenizer, step=step, batch_size=batch_size)


def _restore_ema(ckpt, step: int, config):
  """The EMA of the parameters saved at `step` ('ema' of the train state), whole, on this
  process's first device (as `Checkpointer.restore_params` reads the parameters)."""
  metadata = ckpt._state_metadata(step)   # pylint: disable=protected-access
  if not config.ema_decay or 'ema' not in metadata:
    raise ValueError(f'use_ema=True: checkpoint {ckpt.directory}/{step} keeps no EMA of the '
                     f'parameters (its config.ema_decay={config.ema_decay}).')
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                          metadata)
  return ckpt.restore(template, step)['ema']
