"""Tests for basic/data/write_tfrecords.py: a folder of images + captions, or webdataset tar shards
-> img2dataset shards."""
import io
import json
import os
import subprocess
import sys
import tarfile

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


def _tar(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize('json_caption', ['', 'caption'])
def test_webdataset_shards_to_tfrecords(folder, tmp_path, json_caption):
  """Two tar shards in img2dataset's layout: JPEGs copied, a PNG re-encoded, a corrupt image, a
  sample without .txt (its caption from the .json with --json_caption) and one without an image
  skipped and counted; 'url' from the .json."""
  images, _ = folder
  read = lambda name: (images / name).read_bytes()
  meta = lambda i, text: json.dumps({'url': f'https://x/{i}.jpg', 'caption': text}).encode()
  _tar(tmp_path / 'a.tar', [
      ('000.jpg', read('img0.jpg')), ('000.txt', b'a zero'), ('000.json', meta(0, 'a zero')),
      ('001.png', read('img5.png')), ('001.txt', b'a five'),
      ('002.jpg', read('bad.jpg')), ('002.txt', b'broken'),
  ])
  _tar(tmp_path / 'b.tar', [
      ('003.jpg', read('img1.jpg')), ('003.json', meta(3, 'from json')),
      ('004.txt', b'no image'), ('004.json', meta(4, 'no image')),
      ('005.jpg', read('img2.jpg')), ('005.txt', b'a two'), ('005.parquet', b'x'),
  ])
  out = str(tmp_path / 'out')
  stats = write_tfrecords.write_tfrecords_from_webdataset(
      str(tmp_path), out, json_caption=json_caption, examples_per_shard=2)
  texts = ['a zero', 'a five'] + (['from json'] if json_caption else []) + ['a two']
  assert (stats['written'], stats['skipped_image'], stats['skipped_caption']) == (
      len(texts), 2, 0 if json_caption else 1)
  records = _read(stats['shards'])
  assert [r['txt'].bytes_list.value[0].decode() for r in records] == texts
  assert records[0]['jpg'].bytes_list.value[0] == read('img0.jpg')
  assert tf.io.is_jpeg(records[1]['jpg'].bytes_list.value[0])
  assert records[0]['url'].bytes_list.value[0] == b'https://x/0.jpg'
  assert records[1]['url'].bytes_list.value[0].decode().endswith('a.tar#001')


@pytest.mark.slow   # A fresh process (~10 s of imports); the webdataset reader is tested above.
def test_cli_reads_a_webdataset_folder(folder, tmp_path):
  images, _ = folder
  _tar(tmp_path / 'a.tar', [('0.jpg', (images / 'img0.jpg').read_bytes()), ('0.txt', b'zero'),
                            ('1.jpg', (images / 'bad.jpg').read_bytes()), ('1.txt', b'one')])
  result = subprocess.run(
      [sys.executable, '-m', 'basic.data.write_tfrecords', f'--webdataset={tmp_path}',
       f'--output_dir={tmp_path / "out"}'],
      cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Wrote 1 records in 1 shards' in result.stdout
  assert 'skipped 1 undecodable images and 0 empty captions' in result.stdout
  assert [r['txt'].bytes_list.value[0] for r in _read([str(tmp_path / 'out' / '00000.tfrecord')])
          ] == [b'zero']
