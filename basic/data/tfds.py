"""Data source 'tfds': a prepared TFDS data set by name, read as TFRecord files.

config.data.tfds_name ('name', 'name/config', 'name:1.0.0'), tfds_split (slices allowed,
'train[:90%]') and data_dir ('' = TFDS's default; may be gs://); the image under image_key
(default 'image'), the caption(s) under text_key (default 'caption'; nested features as 'a/b').
Nothing is downloaded. Per-host sharding, epochs, shuffling and bad records:
basic/data/sources.py.
"""
from basic.data import sources

DEFAULTS = {'tfds_name': '', 'tfds_split': 'train', 'data_dir': '', **sources.RECORD_DEFAULTS}


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  for field in ('tfds_name', 'tfds_split', 'data_dir'):
    config_lib.check_str(config, f'data.{field}')
  if not config.data.tfds_name:
    config_lib.fail('data.tfds_name', '', "must name a TFDS data set when "
                    "config.data.source='tfds'.")
  if not config.data.tfds_split:
    config_lib.fail('data.tfds_split', '', "must name a split when config.data.source='tfds'.")
  sources.validate_record_fields(config)


# The host stream, its batches and the tokenizer's captions: the record sources' shared code.
check = sources.check_records
batches = sources.record_batches
captions = sources.captions_of_records
