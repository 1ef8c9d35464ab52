"""Data source 'tfrecord': tf.train.Example shards in img2dataset's schema (basic/data/sources.py).

config.data.tfrecord_pattern is a glob or a comma-separated list of globs (local or gs://) of
TFRecord files whose records hold the encoded image under image_key (default 'jpg') and one
caption, or a list of captions, under text_key (default 'txt'). Per-host sharding, epochs,
shuffling and bad records: basic/data/sources.py.
"""
from basic.data import sources

DEFAULTS = {'tfrecord_pattern': '', **sources.RECORD_DEFAULTS}


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  pattern = config_lib.check_str(config, 'data.tfrecord_pattern')
  if not pattern.strip(' ,'):
    config_lib.fail('data.tfrecord_pattern', pattern,
                    "must be a glob or comma-separated globs when config.data.source='tfrecord'.")
  sources.validate_record_fields(config)


# The host stream, its batches and the tokenizer's captions: the record sources' shared code.
check = sources.check_records
batches = sources.record_batches
captions = sources.captions_of_records
