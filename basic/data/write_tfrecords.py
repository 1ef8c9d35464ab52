r"""Writes a folder of images with a captions file, or webdataset tar shards, as TFRecord shards
in img2dataset's schema.

  python -m basic.data.write_tfrecords --images_dir=photos --captions=photos/captions.tsv \
      --output_dir=data/shards [--examples_per_shard=10000]
  python -m basic.data.write_tfrecords --webdataset='laion/{00000..00099}.tar' \
      --output_dir=data/shards

Webdataset input (--webdataset: a folder of .tar shards, or a glob / brace list as
config.data.webdataset_pattern takes it): the samples of the shards in order, the image and
caption members chosen as the 'webdataset' source chooses them (--image_ext, --text_ext,
--json_caption; see basic/data/webdataset.py); 'url' is the sample's `.json` url if it has one,
else SHARD#KEY.

Captions file: `.tsv` or `.csv` with a header row, or `.jsonl` (one object per line), giving
for each pair the image file (relative to --images_dir) and its caption in the columns / keys
--file_column (default 'file') and --caption_column (default 'caption'). An image listed on
several rows gives one record per row.

Output: `{output_dir}/00000.tfrecord`, `00001.tfrecord`, ... (img2dataset's names) of
tf.train.Example records with img2dataset's features: 'jpg' (JPEG bytes), 'txt' (the caption),
'key' (the 5-digit shard number, then the index in the shard: '000010042'), 'width',
'height' (int64, of the stored image), 'url' (the source file path). JPEG files are copied byte for
byte; other formats (PNG, GIF, BMP, WebP) are decoded and re-encoded as JPEG (--jpeg_quality).
Images that are missing or do not decode and empty captions are skipped and counted. Then train
with `--config.data.source=tfrecord --config.data.tfrecord_pattern='data/shards/*.tfrecord'`.
"""
import csv
import json
import os
from typing import Iterable

from absl import app
from absl import flags
from absl import logging

from basic.data import tf_setup
from basic.data import webdataset

DIGITS_SHARD = 5      # img2dataset: '{shard:05d}.tfrecord'.


def read_captions(path: str, file_column: str = 'file',
                  caption_column: str = 'caption') -> list[tuple[str, str]]:
  """(image file, caption) pairs from a .tsv / .csv (with header) or .jsonl file."""
  tf = tf_setup.configure_tensorflow()
  extension = os.path.splitext(path)[1].lower()
  with tf.io.gfile.GFile(path, 'r') as f:
    if extension == '.jsonl':
      rows = [json.loads(line) for line in f if line.strip()]
    elif extension in ('.tsv', '.csv'):
      rows = list(csv.DictReader(f, delimiter='\t' if extension == '.tsv' else ','))
    else:
      raise ValueError(f'--captions={path!r}: use a .tsv, .csv or .jsonl file.')
  pairs = []
  for i, row in enumerate(rows):
    if file_column not in row or caption_column not in row:
      raise ValueError(f'--captions={path!r}: row {i + 1} has no {file_column!r} / '
                       f'{caption_column!r} field (fields: {sorted(row)}); see --file_column '
                       'and --caption_column.')
    pairs.append((str(row[file_column]), str(row[caption_column] or '')))
  return pairs


def make_example(key: str, jpeg: bytes, caption: str, width: int, height: int, url: str = ''):
  """A tf.train.Example in img2dataset's schema."""
  tf = tf_setup.configure_tensorflow()
  b = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
  i = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
  return tf.train.Example(features=tf.train.Features(feature={
      'key': b(key.encode()), 'jpg': b(jpeg), 'txt': b(caption.encode('utf-8')),
      'width': i(width), 'height': i(height), 'url': b(url.encode('utf-8'))}))


def _as_jpeg(data: bytes, quality: int) -> tuple[bytes, int, int]:
  """(JPEG bytes, width, height); JPEG input is kept as is. Raises if it does not decode."""
  tf = tf_setup.configure_tensorflow()
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  height, width = int(image.shape[0]), int(image.shape[1])
  if not tf.io.is_jpeg(data):
    data = tf.io.encode_jpeg(image, quality=quality).numpy()
  return data, width, height


def _file_items(pairs: Iterable[tuple[str, str]], images_dir: str):
  """(url, read_image, caption) of (image file, caption) pairs."""
  tf = tf_setup.configure_tensorflow()
  for file, caption in pairs:
    path = os.path.join(images_dir, file)

    def read(path=path):
      with tf.io.gfile.GFile(path, 'rb') as f:
        return f.read()
    yield path, read, caption


def write_tfrecords(pairs: Iterable[tuple[str, str]], images_dir: str, output_dir: str, *,
                    examples_per_shard: int = 10_000, jpeg_quality: int = 95) -> dict:
  """Writes (image file, caption) pairs as shards; returns counts and the shard paths.

  Returns:
    dict(shards=list of paths, written=int, skipped_image=int, skipped_caption=int).
  """
  return _write(_file_items(pairs, images_dir), output_dir, examples_per_shard=examples_per_shard,
                jpeg_quality=jpeg_quality)


def _webdataset_items(pattern: str, image_ext: str, text_ext: str, json_caption: str):
  """(url, read_image, caption) of the samples of webdataset shards, in order."""
  tf = tf_setup.configure_tensorflow()
  if tf.io.gfile.isdir(pattern):
    pattern = os.path.join(pattern, '*.tar')
  fmt = webdataset.Format(webdataset.extensions(image_ext), webdataset.extensions(text_ext),
                          json_caption)
  for path in webdataset.shard_files(pattern):
    for key, members in webdataset.read_samples(path):
      image, caption = fmt.image(members), fmt.caption(members)
      url = f'{path}#{key}'
      try:
        url = json.loads(members['json'])['url'] or url
      except (KeyError, TypeError, ValueError):   # No .json, not an object, no url.
        pass
      yield url, (lambda image=image: image), (caption or b'').decode('utf-8', 'replace')


def write_tfrecords_from_webdataset(
    pattern: str, output_dir: str, *,
    image_ext: str = webdataset.DEFAULTS['webdataset_image_ext'],
    text_ext: str = webdataset.DEFAULTS['webdataset_text_ext'],
    json_caption: str = webdataset.DEFAULTS['webdataset_json_caption'],
    examples_per_shard: int = 10_000, jpeg_quality: int = 95) -> dict:
  """Writes the samples of webdataset tar shards (a folder, glob or brace list) as TFRecord
  shards; samples without an image or a caption are skipped and counted. Returns as
  `write_tfrecords`."""
  items = _webdataset_items(pattern, image_ext, text_ext, json_caption)
  return _write(items, output_dir, examples_per_shard=examples_per_shard,
                jpeg_quality=jpeg_quality)


def _write(items, output_dir: str, *, examples_per_shard: int, jpeg_quality: int) -> dict:
  """Writes (url, read_image () -> bytes or None, caption) items as shards."""
  tf = tf_setup.configure_tensorflow()
  if examples_per_shard < 1:
    raise ValueError(f'--examples_per_shard={examples_per_shard}: must be >= 1.')
  tf.io.gfile.makedirs(output_dir)
  digits = len(str(examples_per_shard - 1))
  stats = dict(shards=[], written=0, skipped_image=0, skipped_caption=0)
  writer = None
  for path, read_image, caption in items:
    caption = caption.strip()
    if not caption:
      stats['skipped_caption'] += 1
      continue
    try:
      data = read_image()
      if data is None:
        raise ValueError('no image member')
      jpeg, width, height = _as_jpeg(data, jpeg_quality)
    except (tf.errors.OpError, OSError, ValueError) as e:
      logging.warning('Skipping %s: %s', path, getattr(e, 'message', e))
      stats['skipped_image'] += 1
      continue
    shard, index = divmod(stats['written'], examples_per_shard)
    if index == 0:
      if writer is not None:
        writer.close()
      stats['shards'].append(os.path.join(output_dir, f'{shard:0{DIGITS_SHARD}d}.tfrecord'))
      writer = tf.io.TFRecordWriter(stats['shards'][-1])
    key = f'{shard:0{DIGITS_SHARD}d}{index:0{digits}d}'
    writer.write(make_example(key, jpeg, caption, width, height, path).SerializeToString())
    stats['written'] += 1
  if writer is not None:
    writer.close()
  return stats


def _define_flags():
  flags.DEFINE_string('images_dir', None, 'Folder of the images.')
  flags.DEFINE_string('captions', None, 'Captions file: .tsv / .csv with a header, or .jsonl.')
  flags.DEFINE_string('webdataset', None, 'Instead of --images_dir and --captions: webdataset '
                      'tar shards, a folder of .tar files or a glob / brace list.')
  flags.DEFINE_string('image_ext', webdataset.DEFAULTS['webdataset_image_ext'],
                      '--webdataset: image member extensions, the first present wins.')
  flags.DEFINE_string('text_ext', webdataset.DEFAULTS['webdataset_text_ext'],
                      '--webdataset: caption member extensions.')
  flags.DEFINE_string('json_caption', webdataset.DEFAULTS['webdataset_json_caption'],
                      '--webdataset: key of the .json holding the caption when no caption '
                      'member is present.')
  flags.DEFINE_string('output_dir', None, 'Folder of the TFRecord shards to write.')
  flags.DEFINE_string('file_column', 'file', 'Column / key of the image file name.')
  flags.DEFINE_string('caption_column', 'caption', 'Column / key of the caption.')
  flags.DEFINE_integer('examples_per_shard', 10_000, 'Records per shard.')
  flags.DEFINE_integer('jpeg_quality', 95, 'Quality of non-JPEG images re-encoded as JPEG.')
  flags.mark_flags_as_required(['output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  options = flags.FLAGS
  sizes = dict(examples_per_shard=options.examples_per_shard, jpeg_quality=options.jpeg_quality)
  if options.webdataset:
    if options.images_dir or options.captions:
      raise app.UsageError('Give either --webdataset or --images_dir and --captions.')
    stats = write_tfrecords_from_webdataset(
        options.webdataset, options.output_dir, image_ext=options.image_ext,
        text_ext=options.text_ext, json_caption=options.json_caption, **sizes)
  else:
    if not options.images_dir or not options.captions:
      raise app.UsageError('Give --images_dir and --captions (or --webdataset).')
    pairs = read_captions(options.captions, options.file_column, options.caption_column)
    stats = write_tfrecords(pairs, options.images_dir, options.output_dir, **sizes)
  print(f"Wrote {stats['written']} records in {len(stats['shards'])} shards to "
        f"{options.output_dir}; skipped {stats['skipped_image']} undecodable images and "
        f"{stats['skipped_caption']} empty captions.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
