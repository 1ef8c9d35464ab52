"""Tests for basic/data/write_tfrecords.py: a folder of images + captions -> img2dataset shards."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from basic.data import pipeline
from basic.data import tf_setup
from basic.data import write_tfrecords

tf = tf_setup.configure_tensorflow()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(i, height=20, width=28):
  """A smooth image (JPEG keeps it within a few levels), different for each i."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x * 4 + i * 10, y * 10, np.full_like(x, 255 - i * 25)], -1).astype(np.uint8)


@pytest.fixture()
def folder(tmp_path):
  """8 images (5 JPEG, 3 PNG), a corrupt one; rows: 8 good, 1 repeat, 3 to skip."""
  images = tmp_path / 'images'
  images.mkdir()
  rows = []
  for i in range(8):
    name = f'img{i}.jpg' if i < 5 else f'img{i}.png'
    data = (tf.io.encode_jpeg(_image(i), quality=90) if i < 5 else
            tf.io.encode_png(_image(i))).numpy()
    (images / name).write_bytes(data)
    rows.append((name, f'caption number {i}'))
  (images / 'bad.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  rows += [('img0.jpg', 'caption number 0, again'), ('bad.jpg', 'a broken file'),
           ('missing.png', 'a missing file'), ('img1.jpg', '  ')]
  return images, rows


def _read(paths):
  records = []
  for path in paths:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      records.append(tf.train.Example.FromString(record).features.feature)
  return records


def _check_shards(out, images, rows):
  """The shards in `out` hold exactly the good rows, in img2dataset's schema."""
  assert sorted(os.listdir(out)) == ['00000.tfrecord', '00001.tfrecord', '00002.tfrecord']
  records = _read(sorted(os.path.join(out, p) for p in os.listdir(out)))
  good = [r for r in rows if r[0] not in ('bad.jpg', 'missing.png') and r[1].strip()]
  assert len(records) == len(good) == 9
  for (name, text), feature in zip(good, records):
    assert set(feature) == {'key', 'jpg', 'txt', 'width', 'height', 'url'}
    assert feature['txt'].bytes_list.value[0].decode() == text
    assert (feature['width'].int64_list.value[0], feature['height'].int64_list.value[0]) == (
        28, 20)
    data = feature['jpg'].bytes_list.value[0]
    assert tf.io.is_jpeg(data)
    if name.endswith('.jpg'):   # JPEG files are copied byte for byte.
      assert data == (images / name).read_bytes()
    else:                       # Others re-encoded as JPEG (quality 95).
      decoded = tf.io.decode_jpeg(data).numpy().astype(int)
      assert np.abs(decoded - _image(int(name[3]))).mean() < 3
  keys = [f['key'].bytes_list.value[0].decode() for f in records]
  assert keys == ['000000', '000001', '000002', '000003', '000010', '000011', '000012',
                  '000013', '000020']


def test_writer_writes_img2dataset_shards(folder, tmp_path):
  images, rows = folder
  out = str(tmp_path / 'shards')
  stats = write_tfrecords.write_tfrecords(rows, str(images), out, examples_per_shard=4)
  assert (stats['written'], stats['skipped_image'], stats['skipped_caption']) == (9, 2, 1)
  assert stats['shards'] == [os.path.join(out, f'0000{i}.tfrecord') for i in range(3)]
  _check_shards(out, images, rows)


@pytest.mark.slow   # A fresh process (~10 s of imports); the writer is tested in-process above.
def test_cli_writes_img2dataset_shards(folder, tmp_path):
  images, rows = folder
  captions = tmp_path / 'captions.tsv'
  captions.write_text('file\tcaption\n' + ''.join(f'{f}\t{c}\n' for f, c in rows))
  out = tmp_path / 'shards'
  result = subprocess.run(
      [sys.executable, '-m', 'basic.data.write_tfrecords', f'--images_dir={images}',
       f'--captions={captions}', f'--output_dir={out}', '--examples_per_shard=4'],
      cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Wrote 9 records in 3 shards' in result.stdout
  assert 'skipped 2 undecodable images and 1 empty captions' in result.stdout
  _check_shards(str(out), images, rows)


def test_read_captions_formats(tmp_path):
  jsonl = tmp_path / 'c.jsonl'
  jsonl.write_text('\n'.join(json.dumps({'path': f'{i}.jpg', 'text': f'c {i}'})
                             for i in range(3)) + '\n')
  assert write_tfrecords.read_captions(str(jsonl), 'path', 'text') == [
      ('0.jpg', 'c 0'), ('1.jpg', 'c 1'), ('2.jpg', 'c 2')]
  csv = tmp_path / 'c.csv'
  csv.write_text('file,caption\na.png,"a red, round disk"\n')
  assert write_tfrecords.read_captions(str(csv)) == [('a.png', 'a red, round disk')]
  with pytest.raises(ValueError, match='--file_column'):
    write_tfrecords.read_captions(str(jsonl))
  with pytest.raises(ValueError, match='.tsv, .csv or .jsonl'):
    write_tfrecords.read_captions(str(tmp_path / 'c.txt'))


def test_written_shards_are_a_tfrecord_source(folder, tmp_path):
  """The pipeline reads the shards with its default keys ('jpg', 'txt')."""
  images, rows = folder
  write_tfrecords.write_tfrecords(rows, str(images), str(tmp_path / 'out'), examples_per_shard=5)
  config = ml_collections.ConfigDict(dict(data=dict(
      source='tfrecord', tfrecord_pattern=str(tmp_path / 'out' / '*.tfrecord'), image_key='',
      text_key='', seed=0, shuffle_buffer=100, cycle_length=4, threads=2)))
  captions = list(pipeline.caption_stream(config, 100))
  assert sorted(captions) == sorted(c.strip() for f, c in rows
                                    if f not in ('bad.jpg', 'missing.png') and c.strip())
