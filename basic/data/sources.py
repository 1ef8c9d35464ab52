"""Image-text record sources: TFDS datasets by name and TFRecord shards in img2dataset's schema.

Both sources come down to the same thing, read by the same code: TFRecord file slices holding
serialized `tf.train.Example`s with the encoded image (JPEG, PNG, ...) under `image_key` and one
caption, or a list of captions, as bytes under `text_key`.
  'tfrecord': files from `config.data.tfrecord_pattern`, a glob or a comma-separated list of
    globs, local or `gs://`. img2dataset's schema: 'jpg' (image bytes), 'txt' (caption), 'key',
    and metadata such as 'width', 'height', 'url' (ignored).
  'tfds': the TFRecord files of a prepared TFDS dataset (`config.data.tfds_name`, optionally
    'name/config:version', in `config.data.data_dir`, local or `gs://`); TFDS stores nested
    features flat under '/'-joined names, so COCO-style captions are text_key='captions/text'.
    Nothing is downloaded: the dataset must have been prepared (`tfds build`, or
    `builder.download_and_prepare()`).

Per-host sharding (`host_records`): TFRecord files are dealt to hosts round-robin when there are
at least as many files as hosts (file p, p + P, p + 2P, ... for host p of P); otherwise every
host reads all files in the same order and keeps every P-th record. A TFDS split is cut into P
contiguous, even ranges of examples (`tfds.even_splits`), which read whole files except at
most two per host. Either way the hosts' records are disjoint and together are the data set.

Epochs (`epoch_records`): each epoch reads this host's files in an order permuted by
(seed, epoch), `cycle_length` files at a time (one record from each in turn), then shuffles
records in a buffer seeded by (seed, epoch, host). The stream is a pure function of the config,
the host and the epoch number, so a position in it can be replayed exactly.

Bad records never stop the stream: a TFRecord file that cannot be read further (truncated,
corrupt) ends early with a logged warning; a record whose features have the wrong type, or
whose image does not decode, is dropped downstream (see pipeline.py).
"""
import dataclasses
import os
from typing import Optional

from absl import logging

from basic.data import tf_setup

# Feature names used when config.data.image_key / text_key are empty.
DEFAULT_KEYS = {'tfrecord': ('jpg', 'txt'), 'tfds': ('image', 'caption')}
_SCHEMA_RECORDS = 32    # Records read at start-up to check the feature keys of TFRecord files.
# Stream ids that keep the stateless random streams of one data seed apart (every source's; the
# per-record ones are further below, the pipeline's text masking uses 5, webdataset's resampling 6).
FILE_ORDER, SHUFFLE = 1, 2


@dataclasses.dataclass(frozen=True)
class FileSlice:
  """Records skip .. skip + take - 1 of one TFRecord file (take = -1: to the end)."""
  path: str
  skip: int = 0
  take: int = -1


@dataclasses.dataclass(frozen=True)
class HostRecords:
  """One host's share of a source, for one epoch.

  Attributes:
    slices: the file slices this host reads.
    shard_index, shard_count: keep records shard_index, shard_index + shard_count, ... of the
      slices read in order (sharding by example); (0, 1) when the slices are this host's alone.
    num_records: records per epoch, if known without reading the files (TFDS), else None.
    image_key, text_key: the feature names.
    name: a description for messages and logs.
  """
  slices: tuple[FileSlice, ...]
  shard_index: int
  shard_count: int
  num_records: Optional[int]
  image_key: str
  text_key: str
  name: str


def plain(fn):
  """`fn` exempt from AutoGraph: the tf.data functions here have no Python control flow on
  tensors, and converting them costs about a second per pipeline."""
  tf = tf_setup.configure_tensorflow()
  return tf.autograph.experimental.do_not_convert(fn)


def feature_keys(data_config) -> tuple[str, str]:
  """(image_key, text_key) of config.data, with the source's defaults for empty ones."""
  default_image, default_text = DEFAULT_KEYS[data_config.source]
  return data_config.image_key or default_image, data_config.text_key or default_text


# --- The config of the record sources (tfds, tfrecord). -----------------------------------------

# config.data fields every TFRecord-file source reads (its own are in basic/data/tfds.py and
# tfrecord.py).
RECORD_DEFAULTS = {
    'image_key': '',          # '' = the source's default (DEFAULT_KEYS).
    'text_key': '',
    'seed': 0,                # shuffling and augmentation.
    'shuffle_buffer': 10_000,  # records; 0 = no record shuffling (files still are).
    'cycle_length': 16,       # files read at a time, interleaved record by record.
    'cache': False,           # keep this host's raw records in memory.
}


def validate_record_fields(config):
  """config.data fields of RECORD_DEFAULTS; ConfigError naming the field."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  for field in ('image_key', 'text_key'):
    config_lib.check_str(config, f'data.{field}')
  config_lib.check_int(config, 'data.seed', 0)
  config_lib.check_int(config, 'data.shuffle_buffer', 0)
  config_lib.check_int(config, 'data.cycle_length', 1)
  config_lib.check_bool(config, 'data.cache')


# --- TFRecord files. ------------------------------------------------------------------------------


def tfrecord_files(pattern: str) -> list[str]:
  """The sorted files matched by a glob or a comma-separated list of globs (local or gs://).

  Raises:
    ValueError naming config.data.tfrecord_pattern if the pattern is empty or a part of it
    matches no file.
  """
  tf = tf_setup.configure_tensorflow()
  parts = [p.strip() for p in pattern.split(',') if p.strip()]
  if not parts:
    raise ValueError(f'config.data.tfrecord_pattern={pattern!r}: empty; set it to a glob or a '
                     'comma-separated list of TFRecord files (local or gs://).')
  files = set()
  for part in parts:
    try:
      matched = tf.io.gfile.glob(part)
    except tf.errors.OpError as e:
      raise ValueError(f'config.data.tfrecord_pattern={pattern!r}: cannot list {part!r}: '
                       f'{e.message}') from e
    matched = [f for f in matched if not tf.io.gfile.isdir(f)]
    if not matched:
      raise ValueError(f'config.data.tfrecord_pattern={pattern!r}: {part!r} matches no files.')
    files.update(matched)
  return sorted(files)


def _feature_kinds(example) -> dict[str, str]:
  return {key: feature.WhichOneof('kind') or 'empty'
          for key, feature in example.features.feature.items()}


def check_tfrecord_keys(files: list[str], image_key: str, text_key: str, pattern: str):
  """Checks the first records of `files` hold `image_key` and `text_key` as bytes features.

  A key that none of the first records has, or has as anything but bytes, is a config error
  (a single bad record is not: it is dropped while training).

  Raises:
    ValueError naming config.data.image_key / text_key and the features that exist.
  """
  tf = tf_setup.configure_tensorflow()
  kinds = {}   # feature -> set of kinds seen
  count = 0
  for path in files:
    try:
      for record in tf.data.TFRecordDataset(path).take(_SCHEMA_RECORDS - count):
        example = tf.train.Example.FromString(record.numpy())
        for key, kind in _feature_kinds(example).items():
          kinds.setdefault(key, set()).add(kind)
        count += 1
    except (tf.errors.OpError, ValueError) as e:   # Unreadable file or record: try the next.
      logging.warning('Could not read %s: %s', path, e)
    if count >= _SCHEMA_RECORDS:
      break
  if not count:
    raise ValueError(f'config.data.tfrecord_pattern={pattern!r}: no readable tf.train.Example '
                     f'records in the {len(files)} matched files.')
  seen = ', '.join(f'{k} ({"/".join(sorted(v))})' for k, v in sorted(kinds.items()))
  for field, key in (('image_key', image_key), ('text_key', text_key)):
    if key not in kinds:
      raise ValueError(f'config.data.{field}={key!r}: no such feature in the first {count} '
                       f'records of {files[0]} ({pattern}); features: {seen}.')
    if 'bytes_list' not in kinds[key]:
      raise ValueError(f'config.data.{field}={key!r}: the feature holds '
                       f'{"/".join(sorted(kinds[key]))}, not bytes, in the first {count} '
                       f'records of {files[0]}; features: {seen}.')


# --- TFDS. ----------------------------------------------------------------------------------------


def load_tfds_builder(name: str, data_dir: str, *, field: str, dir_field: str):
  """The prepared TFDS builder `name` in `data_dir` ('' = TFDS's default); downloads nothing.

  The one loader of training sources (`tfds_builder`) and evaluation tasks
  (basic.evaluate.datasets.builder). `field` / `dir_field` name the config fields that gave
  `name` / `data_dir`, for the errors.

  Raises:
    ValueError naming `field` for an unknown, unloadable or unprepared data set.
  """
  tf_setup.configure_tensorflow()   # Before any TF op: CPU only, few threads.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = f'{dir_field}={data_dir!r}'
  first_line = lambda e: str(e).splitlines()[0] if str(e) else ''
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'{field}={name!r}: no such TFDS data set (not registered and not found '
                     f'in {where}): {first_line(e)}') from e
  except Exception as e:  # pylint: disable=broad-except  (bad version / config strings, ...)
    raise ValueError(f'{field}={name!r}: cannot load it ({where}): {type(e).__name__}: '
                     f'{first_line(e)}') from e
  if not builder.is_prepared():
    raise ValueError(f'{field}={name!r}: not prepared in {where} ({builder.data_dir}); prepare '
                     f'it first (`tfds build {name} --data_dir=...`): nothing is downloaded.')
  return builder


def tfds_builder(data_config):
  """The prepared TFDS builder of config.data (tfds_name, data_dir); downloads nothing.

  Raises:
    ValueError naming config.data.tfds_name for an unknown or unprepared data set.
  """
  name = data_config.tfds_name
  if not name:
    raise ValueError("config.data.tfds_name='': set it to a TFDS data set name, e.g. "
                     "'coco_captions' or 'my_dataset/config:1.0.0'.")
  builder = load_tfds_builder(name, data_config.data_dir, field='config.data.tfds_name',
                              dir_field='config.data.data_dir')
  file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
  if file_format != 'tfrecord':
    raise ValueError(f'config.data.tfds_name={name!r}: stored as {file_format}; only the '
                     "'tfrecord' file format is read.")
  return builder


def _flat_features(info) -> dict:
  """'/'-joined feature name -> TensorInfo, as TFDS serialises nested features."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(f'{prefix}{key}/', value)
    else:
      out[prefix[:-1]] = node
  walk('', info.features.get_serialized_info())
  return out


def check_tfds_keys(builder, image_key: str, text_key: str):
  """Checks the TFDS features: `image_key` a scalar bytes feature, `text_key` bytes (or a list).

  Raises:
    ValueError naming config.data.image_key / text_key and the features that exist.
  """
  features = _flat_features(builder.info)
  name = builder.info.full_name
  seen = ', '.join(f'{k} ({v.dtype.name}{list(v.shape)})' for k, v in sorted(features.items()))
  for field, key, ranks in (('image_key', image_key, (0,)), ('text_key', text_key, (0, 1))):
    if key not in features:
      raise ValueError(f'config.data.{field}={key!r}: no such feature in TFDS {name}; '
                       f'features (nested ones as "a/b"): {seen}.')
    info = features[key]
    if info.dtype.name != 'string' or len(info.shape) not in ranks:
      raise ValueError(f'config.data.{field}={key!r}: TFDS {name} stores it as '
                       f'{info.dtype.name}{list(info.shape)}, not as '
                       f'{"encoded image bytes" if field == "image_key" else "text"}.')


def tfds_host_slices(builder, split: str, process_index: int, process_count: int):
  """(file slices, number of examples) of this host's even share of `split`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    host_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    info = builder.info.splits[host_split]
    instructions = info.file_instructions
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f'config.data.tfds_split={split!r}: not a split of TFDS '
                     f'{builder.info.full_name} (splits: {sorted(builder.info.splits)}): '
                     f'{e}') from e
  slices = tuple(FileSlice(str(i.filename), int(i.skip), int(i.take))
                 for i in instructions if i.take != 0)
  return slices, int(info.num_examples)


# --- Both. ----------------------------------------------------------------------------------------


def host_records(data_config, process_index: int = 0, process_count: int = 1) -> HostRecords:
  """This host's records of config.data (source 'tfds' or 'tfrecord'), its keys checked.

  Raises:
    ValueError naming the config field at fault (pattern matching nothing, unknown data set or
    split, missing feature key, no records for this host).
  """
  image_key, text_key = feature_keys(data_config)
  source = data_config.source
  if source == 'tfrecord':
    pattern = data_config.tfrecord_pattern
    files = tfrecord_files(pattern)
    check_tfrecord_keys(files, image_key, text_key, pattern)
    if len(files) >= process_count:
      slices = tuple(FileSlice(f) for f in files[process_index::process_count])
      shard = (0, 1)
    else:
      slices, shard = tuple(FileSlice(f) for f in files), (process_index, process_count)
    host = HostRecords(slices, *shard, None, image_key, text_key,
                       f'{len(files)} TFRecord files matching {pattern}')
  elif source == 'tfds':
    builder = tfds_builder(data_config)
    check_tfds_keys(builder, image_key, text_key)
    slices, count = tfds_host_slices(builder, data_config.tfds_split, process_index,
                                     process_count)
    host = HostRecords(slices, 0, 1, count, image_key, text_key,
                       f'TFDS {builder.info.full_name} split {data_config.tfds_split}')
  else:
    raise ValueError(f'config.data.source={source!r}: not a record source (tfds, tfrecord).')
  if not _has_records(host):
    raise ValueError(f'config.data.source={source!r}: process {process_index} of '
                     f'{process_count} gets no records from {host.name}.')
  return host


def _slice_dataset(tf, path, skip, take):
  """The records of one file slice; a read error ends the file (logged), never the stream."""
  return tf.data.TFRecordDataset(path).skip(skip).take(take).ignore_errors(log_warning=True)


def _read(host: HostRecords, order, cycle_length: int):
  """Records of the slices in `order` (int [num_slices]), interleaved, host-sharded."""
  tf = tf_setup.configure_tensorflow()
  paths = tf.constant([s.path for s in host.slices])
  skips = tf.constant([s.skip for s in host.slices], tf.int64)
  takes = tf.constant([s.take for s in host.slices], tf.int64)
  files = tf.data.Dataset.from_tensor_slices(
      (tf.gather(paths, order), tf.gather(skips, order), tf.gather(takes, order)))
  records = files.interleave(
      plain(lambda path, skip, take: _slice_dataset(tf, path, skip, take)),
      cycle_length=max(1, min(cycle_length, len(host.slices))), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if host.shard_count > 1:
    records = records.shard(host.shard_count, host.shard_index)
  return records


def _has_records(host: HostRecords) -> bool:
  if host.num_records is not None:
    return host.num_records > 0
  tf = tf_setup.configure_tensorflow()
  records = _read(host, tf.range(len(host.slices)), cycle_length=1)
  return bool(records.take(1).reduce(0, plain(lambda count, _: count + 1)).numpy())


def count_records(host: HostRecords, cycle_length: int = 16) -> int:
  """Records per epoch of this host (reads every file unless TFDS metadata knows it)."""
  if host.num_records is not None:
    return host.num_records
  tf = tf_setup.configure_tensorflow()
  records = _read(host, tf.range(len(host.slices)), cycle_length)
  count = records.reduce(tf.constant(0, tf.int64), plain(lambda count, _: count + 1))
  return int(count.numpy())


def stream_seed(tf, seed: int, stream: int, counter):
  """A stateless seed int64 [2] for (data seed, stream id, counter)."""
  return tf.stack([tf.constant(seed * 16 + stream, tf.int64), tf.cast(counter, tf.int64)])


def shuffle_block(tf, records, *, seed: int, shuffle_buffer: int, counter, shuffle_id: int):
  """`records` (one epoch, or one block of shards) shuffled in a buffer of `shuffle_buffer`, by a
  seed of (data seed, SHUFFLE, counter * 65536 + shuffle_id); unchanged when the buffer is <= 1."""
  if shuffle_buffer <= 1:
    return records
  shuffle_seed = tf.random.stateless_uniform(
      [], seed=stream_seed(tf, seed, SHUFFLE, counter * 65536 + shuffle_id),
      minval=None, maxval=None, dtype=tf.int64)
  return records.shuffle(shuffle_buffer, seed=shuffle_seed)


def epoch_records(host: HostRecords, *, seed: int, shuffle_buffer: int, cycle_length: int,
                  cache: bool, start_epoch: int = 0, shuffle_id: int = 0,
                  num_epochs: Optional[int] = None):
  """The record stream of this host: epochs start_epoch, start_epoch + 1, ... (endless).

  Args:
    host: from `host_records`.
    seed: the data seed (config.data.seed).
    shuffle_buffer: records in the shuffle buffer (0 or 1: no record shuffling).
    cycle_length: files read at a time, one record from each in turn.
    cache: keep this host's records in memory after the first epoch (files are then read in
      a fixed order and only the shuffle buffer, reseeded per epoch, reorders them).
    start_epoch: the first epoch of the stream.
    shuffle_id: distinguishes the shuffle buffers of hosts that read the same files
      (the host index).
    num_epochs: stop after this many epochs (None: endless).

  Returns:
    tf.data.Dataset of serialized records (scalar tf.string).
  """
  tf = tf_setup.configure_tensorflow()
  num_slices = len(host.slices)
  fixed = _read(host, tf.range(num_slices), cycle_length).cache() if cache else None

  def one_epoch(epoch):
    if fixed is not None:
      records = fixed
    else:
      # Same order on every host for a given epoch: needed when sharding by example.
      order = tf.argsort(tf.random.stateless_uniform(
          [num_slices], seed=stream_seed(tf, seed, FILE_ORDER, epoch)))
      records = _read(host, order, cycle_length)
    return shuffle_block(tf, records, seed=seed, shuffle_buffer=shuffle_buffer, counter=epoch,
                         shuffle_id=shuffle_id)

  if num_epochs is None:
    epochs = tf.data.Dataset.counter(start_epoch)
  else:
    epochs = tf.data.Dataset.range(start_epoch, start_epoch + num_epochs)
  return epochs.flat_map(plain(one_epoch))


def parse_example(record, image_key: str, text_key: str):
  """A serialized tf.train.Example -> (image bytes, captions) as stored.

  Returns:
    (string [n_images], string [n_captions]) of the bytes features (normally 1 image and 1 or
    more captions). A missing feature gives an empty vector; a feature of another type is an
    error for this element (dropped downstream).
  """
  tf = tf_setup.configure_tensorflow()
  features = tf.io.parse_single_example(record, {
      image_key: tf.io.VarLenFeature(tf.string), text_key: tf.io.VarLenFeature(tf.string)})
  return features[image_key].values, features[text_key].values


def parse_captions(record, text_key: str):
  """A serialized tf.train.Example -> its captions, string [n] (as `parse_example`)."""
  tf = tf_setup.configure_tensorflow()
  features = tf.io.parse_single_example(record, {text_key: tf.io.VarLenFeature(tf.string)})
  return features[text_key].values


def clean_captions(captions):
  """string [n] -> its non-empty captions, invalid UTF-8 replaced and whitespace stripped."""
  tf = tf_setup.configure_tensorflow()
  captions = tf.strings.unicode_transcode(captions, 'UTF-8', 'UTF-8', errors='replace')
  captions = tf.strings.strip(captions)
  return tf.boolean_mask(captions, tf.strings.length(captions) > 0)


# --- The host stream of a record source (basic.data.SOURCES entries tfds, tfrecord). -------------

# Stream ids of the stateless per-example randomness (FILE_ORDER, SHUFFLE above; the pipeline's
# text masking uses 5).
_AUGMENT, _CAPTION = 3, 4


def example_seed(tf, seed: int, stream: int, position, process_index: int, process_count: int):
  """Stateless seed int64 [2] of one record: (data seed, stream id, host, raw position)."""
  counter = tf.cast(position, tf.int64) * process_count + process_index
  return tf.stack([tf.constant(seed * 16 + stream, tf.int64), counter])


def _decode_fn(config, host: HostRecords, process_index: int, process_count: int):
  """-> fn(position, record) -> {'image', 'caption', 'position', 'ok'} for one record."""
  tf = tf_setup.configure_tensorflow()
  from basic.data import preprocess  # pylint: disable=g-import-not-at-top
  data = config.data
  size = data.image_size

  def decode(position, record):
    images, captions = parse_example(record, host.image_key, host.text_key)
    captions = clean_captions(captions)
    num_captions = tf.size(captions)
    image_bytes = tf.strings.reduce_join(images[:1])
    ok = (tf.size(images) == 1) & (tf.strings.length(image_bytes) > 0) & (num_captions > 0)
    # One caption per example and epoch (the position differs between epochs).
    u = tf.random.stateless_uniform([], seed=example_seed(
        tf, data.seed, _CAPTION, position, process_index, process_count))
    index = tf.minimum(tf.cast(u * tf.cast(num_captions, tf.float32), tf.int32),
                       tf.maximum(num_captions - 1, 0))
    caption = tf.gather(tf.concat([captions, ['']], 0), index)
    seed = example_seed(tf, data.seed, _AUGMENT, position, process_index, process_count)
    image = tf.cond(
        ok,
        lambda: preprocess.decode_train_image(image_bytes, size, data.augment, seed,
                                              method=data.resize_method,
                                              antialias=data.antialias),
        lambda: tf.zeros([size, size, 3], tf.uint8))
    return {'image': image, 'caption': caption, 'position': position, 'ok': ok}
  return decode


def record_batches(config, host: HostRecords, *, start_step: int, start_position: int,
                   local_batch: int, process_index: int, process_count: int):
  """Host batches {'image', 'caption', 'position'} of a TFDS / TFRecord host stream:

    records (endless, epoch after epoch) -> enumerate: raw position -> skip(start_position)
    -> parse, pick one caption, decode + augment (basic/data/preprocess.py) -> drop bad
    records -> batch B_local; position = the batch's last raw position + 1.

  The randomness of an example (its crop, flip, erasing and, for a list of captions, which one
  is used) is drawn statelessly from (config.data.seed, host, raw position), and the stream
  order from (config.data.seed, epoch), so resuming at a batch's position yields exactly the
  batches that followed it. Skipping to start_position reads the records before it without
  decoding them; when the number of records per epoch is not in metadata (TFRecord), it is first
  counted with one pass over this host's files. `start_step` is not used (the stream is indexed
  by position).
  """
  del start_step
  tf = tf_setup.configure_tensorflow()
  data = config.data
  start_epoch, offset, first = 0, 0, 0
  if start_position:
    per_epoch = count_records(host, data.cycle_length)
    start_epoch, offset = divmod(start_position, per_epoch)
    logging.info('Resuming the %s stream at record %d: epoch %d (of %d records), record %d.',
                 host.name, start_position, start_epoch, per_epoch, offset)
    first = start_epoch * per_epoch
  records = epoch_records(
      host, seed=data.seed, shuffle_buffer=data.shuffle_buffer, cycle_length=data.cycle_length,
      cache=data.cache, start_epoch=start_epoch, shuffle_id=process_index)
  ds = records.enumerate(start=first).skip(offset)
  ds = ds.map(plain(_decode_fn(config, host, process_index, process_count)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)   # Wrong feature types, undecodable images.
  ds = ds.filter(plain(lambda ex: ex['ok']))
  ds = ds.map(plain(lambda ex: {k: v for k, v in ex.items() if k != 'ok'}))
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.map(plain(lambda b: {'image': b['image'], 'caption': b['caption'],
                                 'position': b['position'][-1] + 1}))


def record_captions(config, host: HostRecords, n: int):
  """Up to `n` non-empty captions (all of a list of captions) of the records of one epoch of
  `host` (shuffled as in training); records that do not parse are skipped. No image is decoded."""
  tf = tf_setup.configure_tensorflow()
  data = config.data
  records = epoch_records(host, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
                          cycle_length=data.cycle_length, cache=False, num_epochs=1)
  captions = records.map(
      plain(lambda r: clean_captions(parse_captions(r, host.text_key))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = data.threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  captions = captions.ignore_errors().unbatch().take(n).with_options(options)
  for caption in captions.as_numpy_iterator():
    yield caption.decode('utf-8')


# The registry entries of the record sources (basic.data.tfds, basic.data.tfrecord) share their
# host stream: `check`, `batches` and `captions` of both are these.
def check_records(config, *, process_index: int = 0, process_count: int = 1) -> HostRecords:
  """This host's records of config.data, its feature keys checked (errors name config.data.*)."""
  return host_records(config.data, process_index, process_count)


def captions_of_records(config, n: int):
  """`record_captions` of this host's records (the tokenizer's training captions)."""
  return record_captions(config, check_records(config), n)
