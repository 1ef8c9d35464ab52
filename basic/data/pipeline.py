"""The input pipeline (tf.data): per-host batches of uint8 images and int32 token ids.

`TrainIterator` (`make_train_iterator`) yields, per training step, this host's slice of the
global batch: {'image': uint8 [B_local, H, W, 3], 'text': int32 [B_local, L]}, with
B_local = config.batch_size // process_count, and keeps the stream's cursor: `state()` after
each batch, `restore(state)` to continue from one. Images stay uint8 until they are on device
(normalisation with config.data.mean / std happens there).

The data source (config.data.source, registered in basic.data.SOURCES; see basic/data/__init__.py
for what an entry exports) gives the host batches of images and captions; here they are
tokenised in-graph per batch (tensorflow-text), text-masked (CLIPA, config.data.text_mask),
prefetched, and the cursor is counted:
  'synthetic': the embedded coloured-shapes data set (basic/data/synthetic.py), the batch of step
    s a pure function of (config.data.synthetic.seed, s); nothing is ever dropped.
  'tfds', 'tfrecord': image-text records (basic/data/sources.py, tfds.py, tfrecord.py), each
    host reading its own record stream, exactly replayable from a position.
  'mixture': weighted named components, each one of the others (basic/data/mixture.py), each
    its own stream with its own cursor (state()['streams']).

Cursor. `state()` = {'step': batches consumed, 'position': the records of this host's stream
consumed through the last batch (over all epochs, dropped records included), 'dropped': those
dropped as bad (position minus the good examples batched so far)}, and for a source of several
streams (the mixture) 'streams': {name: such a cursor of each}. Saved with a checkpoint and
restored, the iterator yields exactly the batches that followed. Skipping to a position reads
the records before it without decoding them.

Bad records. A record with no image, an empty image, no non-empty caption, a feature of the wrong
type, or an image that does not decode (corrupt or truncated) is dropped, logged (TensorFlow
warning) and counted in `dropped`; the run goes on. Configuration errors fail when the iterator
is created (`check_source`): an unknown source, a pattern that matches nothing, an unknown TFDS
name or split, a feature key the data does not have.
"""
import os
from typing import Any, Iterator, Optional

from absl import logging
import numpy as np

import basic.data
from basic.data import preprocess
from basic.data import sources
from basic.data import synthetic
from basic.data import text_mask
from basic.data import tf_setup

_TEXT_MASK = 5   # Stream id of text masking (basic/data/text_mask.py; sources.py uses 1 to 4).
# config.data fields every source shares (checked by `validate`), with the tiny config's values.
COMMON_FIELDS = ('source', 'image_size', 'text_length', 'text_mask', 'mean', 'std', 'threads',
                 'prefetch', 'resize_method', 'antialias', 'augment')


def source_of(config):
  """The basic.data.SOURCES entry of config.data.source; ValueError naming the field."""
  return basic.data.SOURCES.get(config.data.source)


def validate(config):
  """config.data: the common fields, then the source's own (its `validate`).

  Only the config is checked here; files, data sets and feature keys are checked when the input
  pipeline is created (`check_source`), before training.
  """
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  name = config_lib.get_field(config, 'data.source')
  if name not in basic.data.SOURCES:
    config_lib.fail('data.source', name,
                    f'unknown data source; registered: {sorted(basic.data.SOURCES.names())}.')
  config_lib.check_int(config, 'data.image_size', 1)
  config_lib.check_int(config, 'data.text_length', 1)
  for field in ('data.mean', 'data.std'):
    value = config_lib.get_field(config, field)
    if len(value) != 3:
      config_lib.fail(field, value, 'must have 3 entries (RGB).')
  if min(config.data.std) <= 0:
    config_lib.fail('data.std', config.data.std, 'entries must be > 0.')
  config_lib.check_choice(config, 'data.text_mask.kind', text_mask.KINDS)   # CLIPA.
  config_lib.check_int(config, 'data.text_mask.length', 0)
  config_lib.check_int(config, 'data.threads', 0)
  config_lib.check_int(config, 'data.prefetch', 0)
  config_lib.check_str(config, 'data.resize_method')
  config_lib.check_choice(config, 'data.resize_method', preprocess.RESIZE_METHODS)
  config_lib.check_bool(config, 'data.antialias')
  config_lib.check_bool(config, 'data.augment.flip')
  config_lib.check_range(config, 'data.augment.crop_scale', 0, 1)
  config_lib.check_range(config, 'data.augment.crop_ratio', 0, float('inf'))
  prob = config_lib.get_field(config, 'data.augment.erasing_prob')
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
    config_lib.fail('data.augment.erasing_prob', prob, 'must be in [0, 1].')
  config_lib.check_range(config, 'data.augment.erasing_scale', 0, 1, high_open=True)
  config_lib.check_range(config, 'data.augment.erasing_ratio', 0, float('inf'))
  source = source_of(config)
  if hasattr(source, 'validate'):
    source.validate(config)


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """B_local = batch_size // process_count, checking that the batch splits evenly."""
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return batch_size // process_count


def check_source(config, *, process_index: int = 0, process_count: int = 1):
  """Checks config.data's source before training; returns its handle for this host (record
  sources: `sources.HostRecords`; synthetic: None).

  Raises:
    ValueError naming the field: config.data.source (unknown), config.data.tfrecord_pattern (a
    part matches no file), config.data.tfds_name (unknown or unprepared data set),
    config.data.tfds_split, config.data.image_key / text_key (a feature the data lacks; the
    message lists those it has).
  """
  source = source_of(config)
  if not hasattr(source, 'check'):
    return None
  return source.check(config, process_index=process_index, process_count=process_count)


def _tokenize_fn(config, tokenizer, process_index: int, process_count: int):
  """-> fn(captions [B], position) -> int32 [B, L]: text masking (config.data.text_mask), then
  tokenisation. Masking randomness is stateless from (data seed, host, the batch's position)."""
  tf = tf_setup.configure_tensorflow()
  mask = config.data.text_mask
  kind, seed = mask.kind, config.data.seed

  def tokenize(captions, position):
    if kind != 'none':
      captions = text_mask.mask_captions(
          captions, kind, mask.length or config.data.text_length,
          sources.example_seed(tf, seed, _TEXT_MASK, position, process_index, process_count))
    return tokenizer.tf_tokenize(captions)
  return tokenize


def _options(config):
  tf = tf_setup.configure_tensorflow()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.data.threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  return options


class TrainIterator:
  """An endless iterator over this host's training batches that owns its cursor.

  The source is checked when the iterator is created (`check_source`), so configuration errors
  raise here, before training starts.

    it = TrainIterator(config, tokenizer, process_index=..., process_count=...)
    it.restore(saved_state)        # optional: continue after a saved batch
    batch = next(it)               # {'image': uint8 [B_local, H, W, 3], 'text': int32 [B_local, L]}
    it.state()                     # {'step': ..., 'position': ..., 'dropped': ...} (JSON-able ints)

  Args:
    config: the experiment config (reads batch_size and data.*).
    tokenizer: a `basic.tokenizer.Tokenizer` (its `tf_tokenize` runs inside tf.data).
    process_index: this host's index (jax.process_index()).
    process_count: number of hosts (jax.process_count()).
    state: the cursor to start from (default: the beginning), as `restore` takes it.
  """

  def __init__(self, config, tokenizer, *, process_index: int = 0, process_count: int = 1,
               state: Optional[dict] = None):
    self.config, self.tokenizer = config, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = local_batch_size(config.batch_size, process_index, process_count)
    self._source = source_of(config)
    self._handle = check_source(config, process_index=process_index,
                                process_count=process_count)
    if isinstance(self._handle, sources.HostRecords):
      logging.info('Process %d of %d reads %d file slice(s) of %s.', process_index,
                   process_count, len(self._handle.slices), self._handle.name)
    self._iterator = None
    # A source of several streams, each with its own cursor (basic/data/__init__.py `streams`).
    self._stream_names = (list(self._source.streams(config))
                          if hasattr(self._source, 'streams') else None)
    self.restore(state or {})

  def state(self) -> dict:
    """The cursor after the last batch yielded: {'step', 'position', 'dropped'} (ints), and for
    a source of several streams (the mixture) 'streams': {name: {'step', 'position',
    'dropped'}}."""
    state = {'step': self._step, 'position': self._position, 'dropped': self._dropped}
    if self._stream_names is not None:
      state['streams'] = {name: dict(cursor) for name, cursor in self._streams.items()}
    return state

  def restore(self, state: dict):
    """Continues after the batch whose `state()` this was: {'step': batches consumed,
    'position': records consumed, 'dropped': of them dropped} (missing: 0; 'dropped' missing:
    position minus the examples of `step` batches, as counted before it was saved)."""
    step, position = int(state.get('step', 0)), int(state.get('position', 0))
    if step < 0:
      raise ValueError(f'step={step} must be >= 0.')
    if position < 0:
      raise ValueError(f'start_position={position} must be >= 0.')
    dropped = state.get('dropped')
    dropped = max(position - step * self.local_batch, 0) if dropped is None else int(dropped)
    self._step, self._position, self._dropped = step, position, dropped
    self._start = (step, position, dropped)
    if self._stream_names is not None:   # Each sub-stream's cursor (missing: its beginning).
      saved = state.get('streams') or {}
      self._streams = {name: {k: int(saved.get(name, {}).get(k, 0))
                              for k in ('step', 'position', 'dropped')}
                       for name in self._stream_names}
    self._iterator = None   # A busy tf.data iterator is dropped only once a new one is made.
    self._iterator = self._build()

  def _build(self):
    tf = tf_setup.configure_tensorflow()
    step, position, _ = self._start
    streams = {} if self._stream_names is None else {'start_streams': self._streams}
    ds = self._source.batches(
        self.config, self._handle, start_step=step, start_position=position,
        local_batch=self.local_batch, process_index=self.process_index,
        process_count=self.process_count, **streams)
    tokenize = _tokenize_fn(self.config, self.tokenizer, self.process_index, self.process_count)
    ds = ds.map(sources.plain(lambda b: {
        **{k: v for k, v in b.items() if k != 'caption'},
        'text': tokenize(b['caption'], b['position'])}),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(self.config.data.prefetch)
    return ds.with_options(_options(self.config)).as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._step += 1
    self._position = int(batch.pop('position'))
    dropped = batch.pop('dropped', None)
    if dropped is None:   # Records consumed since the start minus the examples batched.
      step0, position0, dropped0 = self._start
      dropped = dropped0 + (self._position - position0) - (self._step - step0) * self.local_batch
    self._dropped = int(dropped)
    cursors = batch.pop('streams', None)
    if cursors is not None:
      self._streams = {name: dict(zip(('step', 'position', 'dropped'), map(int, row)))
                       for name, row in zip(self._stream_names, cursors)}
    return batch


def make_train_iterator(config, tokenizer, *, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1, start_position: int = 0,
                        dropped: Optional[int] = None) -> TrainIterator:
  """`TrainIterator` starting after `start_step` batches at stream position `start_position`
  (the `state()` of the last batch consumed; 0, 0: from the start). Synthetic: start_step selects
  the batch; record sources: start_position does, and start_step only serves to count `dropped`
  when it is not given."""
  return TrainIterator(config, tokenizer, process_index=process_index,
                       process_count=process_count,
                       state={'step': start_step, 'position': start_position, 'dropped': dropped})


def caption_stream(config, n: int) -> Iterator[str]:
  """Up to `n` training captions of config.data's source, e.g. to train a tokenizer.

  Synthetic: the captions of training examples 0 .. n - 1. TFDS / TFRecord: every non-empty
  caption (all of a list of captions) of the records of one epoch of the whole data set (read as
  process 0 of 1, shuffled as in training), stopping after `n`; records that do not parse are
  skipped. No image is decoded.
  """
  return source_of(config).captions(config, n)


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
