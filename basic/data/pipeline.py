"""Input pipelines (tf.data): per-host batches of uint8 images and int32 token ids.

Every source yields, per training step, this host's slice of the global batch as
{'image': uint8 [B_local, H, W, 3], 'caption': string [B_local]}; captions are then tokenised
in-graph and the batches prefetched. Images stay uint8 until they are on device (normalisation
with config.data.mean / std happens there).

Sources (config.data.source):
  'synthetic': the embedded coloured-shapes data set (basic/data/synthetic.py). The batch of step
    s is a pure function of (config.data.synthetic.seed, s): global examples
    s * batch_size ... (s + 1) * batch_size - 1 of the training stream, host p taking the p-th
    contiguous slice. Resuming at any step is therefore exact and needs no iterator state.
TFDS and TFRecord (img2dataset) sources slot in as further branches of `_train_source`.
"""
from typing import Any, Iterator

import numpy as np

from basic.data import synthetic
from basic.data import tf_setup

SOURCES = ('synthetic',)  # config.data.source values; config_lib validates against this.


def _unsupported_source(source: str) -> ValueError:
  return ValueError(f'Unsupported config.data.source={source!r}; supported: {SOURCES} '
                    '(TFDS and TFRecord sources are not implemented yet).')


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """B_local = batch_size // process_count, checking that the batch splits evenly."""
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return batch_size // process_count


def _synthetic_train(config, start_step: int, process_index: int, local_batch: int):
  """Per-step host batches from the shapes data set: {'image', 'caption'} per step."""
  tf = tf_setup.configure_tensorflow()
  dataset = synthetic.ShapesDataset.from_config(config.data)
  batch_size, size = config.batch_size, config.data.image_size

  def generate(step):
    first = int(step) * batch_size + process_index * local_batch
    examples = dataset.train_examples(np.arange(first, first + local_batch, dtype=np.int64))
    captions = np.array([c.encode('utf-8') for c in examples['caption']], dtype=object)
    return examples['image'], captions

  def step_batch(step):
    image, caption = tf.numpy_function(generate, [step], [tf.uint8, tf.string], stateful=False)
    image = tf.ensure_shape(image, [local_batch, size, size, 3])
    caption = tf.ensure_shape(caption, [local_batch])
    return {'image': image, 'caption': caption}

  steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
  return steps.map(step_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _train_source(config, start_step: int, process_index: int, local_batch: int):
  source = config.data.source
  if source == 'synthetic':
    return _synthetic_train(config, start_step, process_index, local_batch)
  raise _unsupported_source(source)


def make_train_iterator(config, tokenizer, *, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """An endless iterator over this host's training batches, starting at `start_step`.

  Args:
    config: the experiment config (reads batch_size and data.*).
    tokenizer: a `basic.tokenizer.Tokenizer` (its `tf_tokenize` runs inside tf.data).
    start_step: the step of the first batch yielded (resume = pass the restored step).
    process_index: this host's index (jax.process_index()).
    process_count: number of hosts (jax.process_count()).

  Yields:
    {'image': uint8 [B_local, H, W, 3], 'text': int32 [B_local, L]} with
    B_local = config.batch_size // process_count and L = tokenizer.length.
  """
  tf = tf_setup.configure_tensorflow()
  local_batch = local_batch_size(config.batch_size, process_index, process_count)
  ds = _train_source(config, start_step, process_index, local_batch)
  ds = ds.map(lambda ex: {'image': ex['image'], 'text': tokenizer.tf_tokenize(ex['caption'])},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(config.data.prefetch)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = tf_setup.DEFAULT_THREADS
  return ds.with_options(options).as_numpy_iterator()


def make_zeroshot_data(config, tokenizer=None, split: str = 'heldout') -> dict[str, Any]:
  """Zero-shot classification data: the held-out (or seen) combinations among all 48 classes.

  Args:
    config: the experiment config (reads data.*).
    tokenizer: optional `Tokenizer`; if given, the prompts are tokenised too.
    split: 'heldout' (combinations never seen in training) or 'seen' (training combinations,
      images from a stream disjoint from training).

  Returns:
    dict(images=uint8 [n, H, W, 3], labels=int32 [n] indexing class_names,
    class_names=list of all 48 str, templates=list of T str with one '{}',
    captions=object [n] of str), plus prompt_tokens=int32 [48, T, L] (the tokenised
    template.format(class_name)) when a tokenizer is given. n = eval_per_class * classes in split.
  """
  if config.data.source != 'synthetic':
    raise _unsupported_source(config.data.source)
  dataset = synthetic.ShapesDataset.from_config(config.data)
  examples = dataset.eval_examples(config.data.synthetic.eval_per_class, split)
  data = dict(images=examples['image'], labels=examples['label'],
              class_names=list(dataset.class_names),
              templates=list(synthetic.ZEROSHOT_TEMPLATES), captions=examples['caption'])
  if tokenizer is not None:
    prompts = [t.format(c) for c in data['class_names'] for t in data['templates']]
    data['prompt_tokens'] = tokenizer.encode(prompts).reshape(
        len(data['class_names']), len(data['templates']), -1)
  return data
