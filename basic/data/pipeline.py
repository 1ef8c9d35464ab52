"""Input pipelines (tf.data): per-host batches of uint8 images and int32 token ids.

`make_train_iterator` yields, per training step, this host's slice of the global batch:
{'image': uint8 [B_local, H, W, 3], 'text': int32 [B_local, L], 'position': int64 [],
'dropped': int64 []}, with B_local = config.batch_size // process_count. Captions are tokenised
in-graph (tensorflow-text) per batch. Images stay uint8 until they are on device (normalisation
with config.data.mean / std happens there).

Sources (config.data.source, see SOURCES):
  'synthetic': the embedded coloured-shapes data set (basic/data/synthetic.py). The batch of step
    s is a pure function of (config.data.synthetic.seed, s): global examples
    s * batch_size ... (s + 1) * batch_size - 1 of the training stream, host p taking the p-th
    contiguous slice. Resuming at any step is exact (`start_step`) and needs no iterator state.
    position = (s + 1) * B_local, dropped = 0; no augmentation.
  'tfds', 'tfrecord': image-text records (basic/data/sources.py: which files each host reads,
    per-epoch file and record shuffling). Each host reads its own record stream:
      records (endless, epoch after epoch) -> enumerate: raw position -> skip(start_position)
      -> parse, pick one caption, decode + augment (basic/data/preprocess.py) -> drop bad
      records -> batch B_local -> tokenise -> prefetch.
    The randomness of an example (its crop, flip, erasing and, for a list of captions, which one
    is used) is drawn statelessly from (config.data.seed, host, raw position), and the stream
    order from (config.data.seed, epoch), so resuming at a batch's `position` yields exactly the
    batches that followed it, and a record seen in another epoch gets another caption and crop.

Resume. `position` is the number of raw records of this host's stream consumed through the end
of the batch (over all epochs, dropped records included); `dropped` the number of them dropped
as bad (position minus the good examples batched so far). Save both with the step; resume with
`make_train_iterator(..., start_step=step, start_position=position)`, where `step` is the number
of batches consumed (the restored train step): it only serves to count `dropped`. Skipping to
`start_position` reads the records before it without decoding them; when the number of records
per epoch is not in metadata (TFRecord), it is first counted with one pass over this host's files.

Bad records. A record with no image, an empty image, no non-empty caption, a feature of the wrong
type, or an image that does not decode (corrupt or truncated) is dropped, logged (TensorFlow
warning) and counted in `dropped`; the run goes on. A TFRecord file that cannot be read further
ends early (logged). Configuration errors fail at iterator creation (`check_source`): a pattern
that matches nothing, an unknown TFDS name or split, a feature key the data does not have.
"""
import collections
import os
from typing import Any, Callable, Iterable, Iterator, Optional

from absl import logging
import numpy as np

from basic.data import preprocess
from basic.data import sources
from basic.data import synthetic
from basic.data import text_mask
from basic.data import tf_setup

SOURCES = ('synthetic', 'tfds', 'tfrecord')  # config.data.source values; config_lib validates.
RECORD_SOURCES = ('tfds', 'tfrecord')
# Stream ids of the stateless per-example randomness (sources.py uses 1 and 2).
_AUGMENT, _CAPTION = 3, 4
_TEXT_MASK = 5   # Stream id of text masking (basic/data/text_mask.py).
_SYNTHETIC_CHUNK = 4096   # Synthetic examples rendered at a time (memory, not results).


def _unsupported_source(source: str) -> ValueError:
  return ValueError(f'Unsupported config.data.source={source!r}; supported: {SOURCES}.')


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """B_local = batch_size // process_count, checking that the batch splits evenly."""
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return batch_size // process_count


def _synthetic_train(config, start_step: int, process_index: int, local_batch: int):
  """Per-step host batches from the shapes data set: {'image', 'caption', 'position', 'dropped'}."""
  tf = tf_setup.configure_tensorflow()
  dataset = synthetic.ShapesDataset.from_config(config.data)
  batch_size, size = config.batch_size, config.data.image_size

  def generate(step):
    first = int(step) * batch_size + process_index * local_batch
    image = np.empty((local_batch, size, size, 3), np.uint8)
    captions = np.empty(local_batch, dtype=object)
    # Rendered _SYNTHETIC_CHUNK examples at a time: an example is a function of its index alone,
    # so the batch is the same, and the float32 temporaries of rendering stay ~50 MB instead of
    # growing with the batch (4 GB at 65536).
    for start in range(0, local_batch, _SYNTHETIC_CHUNK):
      stop = min(start + _SYNTHETIC_CHUNK, local_batch)
      examples = dataset.train_examples(np.arange(first + start, first + stop, dtype=np.int64))
      image[start:stop] = examples['image']
      captions[start:stop] = [c.encode('utf-8') for c in examples['caption']]
    return image, captions

  def step_batch(step):
    image, caption = tf.numpy_function(generate, [step], [tf.uint8, tf.string], stateful=False)
    image = tf.ensure_shape(image, [local_batch, size, size, 3])
    caption = tf.ensure_shape(caption, [local_batch])
    return {'image': image, 'caption': caption, 'position': (step + 1) * local_batch,
            'dropped': tf.constant(0, tf.int64)}

  steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
  return steps.map(sources.plain(step_batch), num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=True)


def check_source(config, *, process_index: int = 0,
                 process_count: int = 1) -> Optional[sources.HostRecords]:
  """Checks config.data's source before training; returns this host's records (None: synthetic).

  Raises:
    ValueError naming the field: config.data.source (unknown), config.data.tfrecord_pattern (a
    part matches no file), config.data.tfds_name (unknown or unprepared data set),
    config.data.tfds_split, config.data.image_key / text_key (a feature the data lacks; the
    message lists those it has).
  """
  source = config.data.source
  if source == 'synthetic':
    return None
  if source not in RECORD_SOURCES:
    raise _unsupported_source(source)
  return sources.host_records(config.data, process_index, process_count)


def _example_seed(tf, seed: int, stream: int, position, process_index: int, process_count: int):
  """Stateless seed int64 [2] of one record: (data seed, stream id, host, raw position)."""
  counter = tf.cast(position, tf.int64) * process_count + process_index
  return tf.stack([tf.constant(seed * 16 + stream, tf.int64), counter])


def _decode_fn(config, host: sources.HostRecords, process_index: int, process_count: int):
  """-> fn(position, record) -> {'image', 'caption', 'position', 'ok'} for one record."""
  tf = tf_setup.configure_tensorflow()
  data = config.data
  size = data.image_size

  def decode(position, record):
    images, captions = sources.parse_example(record, host.image_key, host.text_key)
    captions = sources.clean_captions(captions)
    num_captions = tf.size(captions)
    image_bytes = tf.strings.reduce_join(images[:1])
    ok = (tf.size(images) == 1) & (tf.strings.length(image_bytes) > 0) & (num_captions > 0)
    # One caption per example and epoch (the position differs between epochs).
    u = tf.random.stateless_uniform([], seed=_example_seed(
        tf, data.seed, _CAPTION, position, process_index, process_count))
    index = tf.minimum(tf.cast(u * tf.cast(num_captions, tf.float32), tf.int32),
                       tf.maximum(num_captions - 1, 0))
    caption = tf.gather(tf.concat([captions, ['']], 0), index)
    seed = _example_seed(tf, data.seed, _AUGMENT, position, process_index, process_count)
    image = tf.cond(
        ok,
        lambda: preprocess.decode_train_image(image_bytes, size, data.augment, seed,
                                              method=data.resize_method,
                                              antialias=data.antialias),
        lambda: tf.zeros([size, size, 3], tf.uint8))
    return {'image': image, 'caption': caption, 'position': position, 'ok': ok}
  return decode


def _tokenize_fn(config, tokenizer, process_index: int, process_count: int):
  """-> fn(captions [B], position) -> int32 [B, L]: text masking (config.data.text_mask), then
  tokenisation. Masking randomness is stateless from (data seed, host, the batch's position)."""
  tf = tf_setup.configure_tensorflow()
  mask = config.data.get('text_mask', None)
  kind = mask.kind if mask is not None else 'none'

  def tokenize(captions, position):
    if kind != 'none':
      seed = _example_seed(tf, config.data.seed, _TEXT_MASK, position, process_index,
                           process_count)
      captions = text_mask.mask_captions(captions, kind,
                                         mask.length or config.data.text_length, seed)
    return tokenizer.tf_tokenize(captions)
  return tokenize


def _record_train(config, tokenizer, host: sources.HostRecords, *, start_step: int,
                  start_position: int, local_batch: int, process_index: int,
                  process_count: int):
  """Batches {'image', 'text', 'position', 'dropped'} of a TFDS / TFRecord host stream."""
  tf = tf_setup.configure_tensorflow()
  data = config.data
  start_epoch, offset = 0, 0
  if start_position:
    per_epoch = sources.count_records(host, data.cycle_length)
    start_epoch, offset = divmod(start_position, per_epoch)
    logging.info('Resuming the %s stream at record %d: epoch %d (of %d records), record %d.',
                 host.name, start_position, start_epoch, per_epoch, offset)
    first = start_epoch * per_epoch
  else:
    first = 0
  records = sources.epoch_records(
      host, seed=data.seed, shuffle_buffer=data.shuffle_buffer, cycle_length=data.cycle_length,
      cache=data.cache, start_epoch=start_epoch, shuffle_id=process_index)
  ds = records.enumerate(start=first).skip(offset)
  ds = ds.map(sources.plain(_decode_fn(config, host, process_index, process_count)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)   # Wrong feature types, undecodable images.
  ds = ds.filter(sources.plain(lambda ex: ex['ok']))
  ds = ds.map(sources.plain(lambda ex: {k: v for k, v in ex.items() if k != 'ok'}))
  ds = ds.batch(local_batch, drop_remainder=True).enumerate()
  # Drops before the resume point: its records minus the good examples of the batches before
  # (0 for a stream that starts at its beginning, whatever start_step is).
  dropped_before = max(start_position - start_step * local_batch, 0)
  tokenize = _tokenize_fn(config, tokenizer, process_index, process_count)

  def finish(k, batch):
    position = batch['position'][-1] + 1
    good = (k + 1) * local_batch
    return {'image': batch['image'], 'text': tokenize(batch['caption'], position),
            'position': position,
            'dropped': dropped_before + (position - start_position) - good}
  return ds.map(sources.plain(finish), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _options(config):
  tf = tf_setup.configure_tensorflow()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.data.threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  return options


def make_train_iterator(config, tokenizer, *, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1,
                        start_position: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """An endless iterator over this host's training batches.

  Checks the source first (`check_source`), so configuration errors raise here, before
  training starts.

  Args:
    config: the experiment config (reads batch_size and data.*).
    tokenizer: a `basic.tokenizer.Tokenizer` (its `tf_tokenize` runs inside tf.data).
    start_step: the step of the first batch yielded: the number of batches consumed before
      (resume = pass the restored step). Synthetic: it selects the batch; record sources: it
      only serves to count `dropped`.
    process_index: this host's index (jax.process_index()).
    process_count: number of hosts (jax.process_count()).
    start_position: record sources: the `position` of the last batch consumed (0 = from the
      start); the batches yielded are exactly those that followed it. Ignored by 'synthetic'.

  Yields:
    {'image': uint8 [B_local, H, W, 3], 'text': int32 [B_local, L], 'position': int64 [],
    'dropped': int64 []} with B_local = config.batch_size // process_count,
    H = W = config.data.image_size and L = tokenizer.length (see the module docstring).
  """
  tf = tf_setup.configure_tensorflow()
  local_batch = local_batch_size(config.batch_size, process_index, process_count)
  if start_position < 0:
    raise ValueError(f'start_position={start_position} must be >= 0.')
  host = check_source(config, process_index=process_index, process_count=process_count)
  if host is None:
    ds = _synthetic_train(config, start_step, process_index, local_batch)
    tokenize = _tokenize_fn(config, tokenizer, process_index, process_count)
    ds = ds.map(sources.plain(lambda ex: {
        'image': ex['image'], 'text': tokenize(ex['caption'], ex['position']),
        'position': ex['position'], 'dropped': ex['dropped']}),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    logging.info('Process %d of %d reads %d file slice(s) of %s.', process_index,
                 process_count, len(host.slices), host.name)
    ds = _record_train(config, tokenizer, host, start_step=start_step,
                       start_position=start_position, local_batch=local_batch,
                       process_index=process_index, process_count=process_count)
  ds = ds.prefetch(config.data.prefetch)
  return ds.with_options(_options(config)).as_numpy_iterator()


def caption_stream(config, n: int) -> Iterator[str]:
  """Up to `n` training captions of config.data's source, e.g. to train a tokenizer.

  Synthetic: the captions of training examples 0 .. n - 1. TFDS / TFRecord: every non-empty
  caption (all of a list of captions) of the records of one epoch of the whole data set (read as
  process 0 of 1, shuffled as in training), stopping after `n`; records that do not parse are
  skipped. No image is decoded.
  """
  if config.data.source == 'synthetic':
    yield from synthetic.ShapesDataset.from_config(config.data).captions(n)
    return
  tf = tf_setup.configure_tensorflow()
  host = check_source(config)
  data = config.data
  records = sources.epoch_records(host, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
                                  cycle_length=data.cycle_length, cache=False, num_epochs=1)
  captions = records.map(
      sources.plain(lambda r: sources.clean_captions(sources.parse_captions(r, host.text_key))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  captions = captions.ignore_errors().unbatch().take(n).with_options(_options(config))
  for caption in captions.as_numpy_iterator():
    yield caption.decode('utf-8')


def prefetch_to_device(iterator: Iterable[Any], put: Callable[[Any], Any],
                       size: int = 2) -> Iterator[Any]:
  """Yields put(batch) for each batch, keeping `size` batches put ahead.

  `put` starts the host-to-device copy (e.g. `lambda b: sharding.global_batch(b, mesh)`, which
  returns at once: JAX transfers asynchronously), so the next batches are on their way to the
  devices while the current step runs. size=0 puts each batch only when it is needed.
  """
  queue = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


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
    raise ValueError(f'config.data.source={config.data.source!r}: zero-shot evaluation data '
                     "exist only for the 'synthetic' source so far; set "
                     'config.eval.zeroshot=False.')
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
