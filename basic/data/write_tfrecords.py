r"""Writes a folder of images with a captions file as TFRecord shards in img2dataset's schema.

  python -m basic.data.write_tfrecords --images_dir=photos --captions=photos/captions.tsv \
      --output_dir=data/shards [--examples_per_shard=10000]

Captions file: `.tsv` or `.csv` with a header row, or `.jsonl` (one object per line), giving
for each pair the image file (relative to --images_dir) and its caption in the columns / keys
--file_column (default 'file') and --caption_column (default 'caption'). An image listed on
several rows gives one record per row.

Output: `{output_dir}/00000.tfrecord`, `00001.tfrecord`, ... (img2dataset's names) of
tf.train.Example records with img2dataset's features: 'jpg' (JPEG bytes), 'txt' (the caption),
'key' (the 5-digit shard number, then the index in the shard: '000010042'), 'width',
'height' (int64, of the stored image), 'url' (the source file path). JPEG files are copied byte for
byte; other formats (PNG, GIF, BMP, WebP) are decoded and re-encoded as JPEG (--jpeg_quality).
Images that do not decode and empty captions are skipped and counted. Then train with
`--config.data.source=tfrecord --config.data.tfrecord_pattern='data/shards/*.tfrecord'`.
"""
import csv
import json
import os
from typing import Iterable

from absl import app
from absl import flags
from absl import logging

from basic.data import tf_setup

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


def write_tfrecords(pairs: Iterable[tuple[str, str]], images_dir: str, output_dir: str, *,
                    examples_per_shard: int = 10_000, jpeg_quality: int = 95) -> dict:
  """Writes (image file, caption) pairs as shards; returns counts and the shard paths.

  Returns:
    dict(shards=list of paths, written=int, skipped_image=int, skipped_caption=int).
  """
  tf = tf_setup.configure_tensorflow()
  if examples_per_shard < 1:
    raise ValueError(f'--examples_per_shard={examples_per_shard}: must be >= 1.')
  tf.io.gfile.makedirs(output_dir)
  digits = len(str(examples_per_shard - 1))
  stats = dict(shards=[], written=0, skipped_image=0, skipped_caption=0)
  writer = None
  for file, caption in pairs:
    caption = caption.strip()
    if not caption:
      stats['skipped_caption'] += 1
      continue
    path = os.path.join(images_dir, file)
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        jpeg, width, height = _as_jpeg(f.read(), jpeg_quality)
    except (tf.errors.OpError, OSError) as e:
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
  flags.DEFINE_string('output_dir', None, 'Folder of the TFRecord shards to write.')
  flags.DEFINE_string('file_column', 'file', 'Column / key of the image file name.')
  flags.DEFINE_string('caption_column', 'caption', 'Column / key of the caption.')
  flags.DEFINE_integer('examples_per_shard', 10_000, 'Records per shard.')
  flags.DEFINE_integer('jpeg_quality', 95, 'Quality of non-JPEG images re-encoded as JPEG.')
  flags.mark_flags_as_required(['images_dir', 'captions', 'output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  options = flags.FLAGS
  pairs = read_captions(options.captions, options.file_column, options.caption_column)
  stats = write_tfrecords(pairs, options.images_dir, options.output_dir,
                          examples_per_shard=options.examples_per_shard,
                          jpeg_quality=options.jpeg_quality)
  print(f"Wrote {stats['written']} records in {len(stats['shards'])} shards to "
        f"{options.output_dir}; skipped {stats['skipped_image']} undecodable images and "
        f"{stats['skipped_caption']} empty captions.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
