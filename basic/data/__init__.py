"""Training data: the data-source registry (`config.data.source`) and the input pipeline.

A data source is one module (or object) registered here by one line; `pipeline.TrainIterator`
turns its host batches into tokenised training batches with a resumable cursor. It exports:

  DEFAULTS               {field: default} of the config.data fields it reads beyond the common
                         ones of pipeline.COMMON_FIELDS (image_size, text_length, mean, std,
                         text_mask, threads, prefetch, resize_method, antialias, augment);
                         a new source keeps its own under config.data.<name>.
  validate(config)       config-only checks; raises config_lib.ConfigError naming the field.
  check(config, *, process_index, process_count) -> handle
                         reaches the data before training (files, data sets, feature keys) and
                         returns what `batches` needs (or None); errors name the config field.
  batches(config, handle, *, start_step, start_position, local_batch, process_index,
          process_count) -> tf.data.Dataset, endless, of this host's batches
                         {'image': uint8 [B_local, S, S, 3], 'caption': string [B_local],
                          'position': int64 []} and optionally 'dropped': int64 [].
                         `position` counts the records of this host's stream consumed through the
                         batch; resuming with start_position = a batch's position must yield
                         exactly the batches that followed it (start_step: the batches consumed
                         before, for sources indexed by step). Without 'dropped', the pipeline
                         counts position minus the examples batched.
  captions(config, n) -> Iterator[str]
                         up to n training captions (to train a tokenizer).
  streams(config) -> list[str]   (optional)
                         a source made of several streams, each with its own cursor (the
                         mixture's components): their names. Its `batches` then also takes
                         start_streams={name: {'step', 'position', 'dropped'}} and yields
                         'streams': int64 [len(names), 3], each stream's cursor after the batch;
                         TrainIterator.state()['streams'] keeps them and the checkpoint saves
                         them per host.

  SOURCES.register('mine', 'my_package.my_source')   # then config.data.source = 'mine'
"""
from basic import registry

SOURCES = registry.Registry('data source', 'config.data.source')
SOURCES.register('synthetic', 'basic.data.synthetic')
SOURCES.register('tfds', 'basic.data.tfds')
SOURCES.register('tfrecord', 'basic.data.tfrecord')
SOURCES.register('webdataset', 'basic.data.webdataset')
SOURCES.register('mixture', 'basic.data.mixture')
