"""The webdataset source (basic/data/webdataset.py): tar shards as img2dataset writes them, with
bad samples; per-host sharding, drop counts, exact resume, resampling, errors, training."""
import io
import itertools
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest

import data_helpers as helpers
from basic import config_lib
from basic import metric_writers
from basic import tokenizer as tokenizer_lib
from basic import train
from basic.data import pipeline
from basic.data import webdataset
from configs import tiny
from PIL import Image

tf = helpers.tf
N, NUM_SHARDS = 32, 4   # Samples 0 .. 31, 8 per shard.
# Bad samples and how; each is dropped (the json caption recovers 'no_txt').
BAD = {3: 'truncated_jpeg', 7: 'not_an_image', 10: 'no_txt', 13: 'blank_caption', 18: 'no_image'}
GOOD = [i for i in range(N) if i not in BAD]
FORMATS = {21: 'png', 22: 'webp'}   # Image members of other formats (extensions png, webp).
STRAY = 25                          # A sample with an extra member of another extension.


def _key(i):
  return f'{i // 8:05d}{i % 8:04d}'   # img2dataset: shard number, then the index in it.


def _members(i, image, text):
  """The members of sample i as img2dataset writes them ('.jpg', '.txt', '.json'), made bad
  as BAD says."""
  kind, key = BAD.get(i), _key(i)
  if i in FORMATS:
    out = io.BytesIO()
    Image.fromarray(image).save(out, FORMATS[i].upper())
    members = [(f'{key}.{FORMATS[i]}', out.getvalue())]
  else:
    data = helpers.jpeg(image)
    if kind == 'truncated_jpeg':
      data = data[:len(data) // 2]
    elif kind == 'not_an_image':
      data = b'<html>404 Not Found</html>'
    members = [(f'{key}.jpg', data)] if kind != 'no_image' else []
  if kind != 'no_txt':
    members.append((f'{key}.txt', (' \t ' if kind == 'blank_caption' else text).encode()))
  members.append((f'{key}.json', json.dumps(
      {'url': f'https://example.com/{i}.jpg', 'caption': text, 'key': key}).encode()))
  if i == STRAY:
    members.append((f'{key}.parquet', b'PAR1'))
  return members


def write_tars(directory, n=N, num_shards=NUM_SHARDS):
  """n samples (image i, caption helpers.caption(i)) in num_shards tar shards; returns (paths,
  captions). The first shard also holds a member without an extension (skipped)."""
  images, names = helpers.images_and_names(n)
  captions = [helpers.caption(i, names) for i in range(n)]
  os.makedirs(directory, exist_ok=True)
  paths = []
  per_shard = n // num_shards
  for s in range(num_shards):
    paths.append(os.path.join(directory, f'{s:05d}.tar'))
    with tarfile.open(paths[-1], 'w') as tar:
      if s == 0:
        _add(tar, 'README', b'not a sample')
      for i in range(s * per_shard, (s + 1) * per_shard):
        for name, data in _members(i, images[i], captions[i]):
          _add(tar, name, data)
  return paths, captions


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), 1_700_000_000
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('wds')
  paths, captions = write_tars(str(root / 'shards'))
  single, _ = write_tars(str(root / 'single'), num_shards=1)
  path = tokenizer_lib.train(captions * 4, 128, str(root / 'spm.model'))
  return dict(root=root, paths=paths, single=single, captions=captions, tokenizer_path=path)


@pytest.fixture(scope='module')
def tokenizer(data):
  return tokenizer_lib.Tokenizer(data['tokenizer_path'], 16)


def _config(pattern, batch_size=3, **data):
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.update({'source': 'webdataset', 'webdataset_pattern': pattern, **data})
  return config


def _take(config, tokenizer, n, **kwargs):
  """n batches, each with the iterator's cursor after it ('step', 'position', 'dropped')."""
  iterator = pipeline.make_train_iterator(config, tokenizer, **kwargs)
  return [{**batch, **iterator.state()} for batch in itertools.islice(iterator, n)]


def _ids(tokenizer, batch):
  """The sample index i of each row, from its decoded caption 'photo {i} ...'."""
  return [int(text.split()[1]) for text in tokenizer.decode(batch['text'])]


def _raw_keys(config, process_index=0, process_count=1, n=N):
  """The sample indices of the first n records of a host's raw stream (bad ones included)."""
  host = webdataset.check(config, process_index=process_index, process_count=process_count)
  stream = webdataset.record_stream(host, config.data, shuffle_id=process_index).take(n)
  out = []
  for _, record in stream.as_numpy_iterator():
    key = tf.train.Example.FromString(record).features.feature['key'].bytes_list.value[0]
    out.append(int(key[:5]) * 8 + int(key[5:]))
  return out


def _assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- The tar reader. ------------------------------------------------------------------------------


@pytest.mark.parametrize('tar_format', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                        tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile(tmp_path, tar_format):
  """Long names (ustar prefix, GNU 'L', pax 'path'), a directory, empty and large members."""
  names = ['d/' + 'x' * 130 + '/000001.jpg', '000002.txt', '000002.seg.png', 'empty.txt',
           'ü' * 40 + '.txt']
  path = tmp_path / 'a.tar'
  with tarfile.open(path, 'w', format=tar_format) as tar:
    tar.addfile(tarfile.TarInfo('dir/'))
    for i, name in enumerate(names):
      if tar_format == tarfile.USTAR_FORMAT and not name.isascii():
        continue
      _add(tar, name, os.urandom(i * 3000 + (i != 3)) if name != 'empty.txt' else b'')
  with tarfile.open(path) as tar:
    expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
  with open(path, 'rb') as f:
    assert list(webdataset.tar_members(f)) == expected
  with open(path, 'rb') as f:   # Counting mode: same names, data skipped.
    assert list(webdataset.tar_members(f, os.path.getsize(path))) == [
        (n, b'') for n, _ in expected]


def test_samples_group_members_by_key(data):
  samples = list(webdataset.read_samples(data['paths'][3]))
  assert [k for k, _ in samples] == [_key(i) for i in range(24, 32)]
  assert sorted(samples[STRAY - 24][1]) == ['jpg', 'json', 'parquet', 'txt']
  first = list(webdataset.read_samples(data['paths'][0]))   # 'README' has no extension.
  assert [k for k, _ in first] == [_key(i) for i in range(8)]
  assert sorted(first[3][1]) == ['jpg', 'json', 'txt']
  assert [webdataset.count_samples(p) for p in data['paths']] == [8] * 4
  assert webdataset.split_name('a/b/000123.seg.PNG') == ('a/b/000123', 'seg.png')
  # Paths with a scheme (gs://, here file://) are read through tf.io.gfile: the same samples.
  remote = webdataset.shard_files(f'file://{os.path.dirname(data["paths"][3])}/0000{{3..3}}.tar')
  assert remote == [f'file://{data["paths"][3]}']
  assert list(webdataset.read_samples(remote[0])) == list(webdataset.read_samples(
      data['paths'][3]))
  assert webdataset.count_samples(remote[0]) == 8
  assert webdataset.split_name('README') == ('', '')


def test_truncated_shard_ends_with_its_complete_samples(data, tmp_path):
  """A shard cut inside sample 5's image: samples 0-4 read, then sample 5 with the members
  complete before the cut (none here: the image was first); reading and counting agree."""
  content = open(data['paths'][0], 'rb').read()
  with tarfile.open(data['paths'][0]) as tar:
    offset = next(m.offset_data for m in tar.getmembers() if m.name == f'{_key(5)}.jpg')
  cut = tmp_path / 'cut.tar'
  cut.write_bytes(content[:offset + 100])
  samples = list(webdataset.read_samples(str(cut)))
  assert [k for k, _ in samples] == [_key(i) for i in range(5)]
  assert webdataset.count_samples(str(cut)) == 5
  (tmp_path / 'junk.tar').write_bytes(b'\x01' * 4096)   # Not a tar: a bad header checksum.
  assert webdataset.count_samples(str(tmp_path / 'junk.tar')) == 0


def test_patterns_braces_and_globs(data):
  shards = os.path.dirname(data['paths'][0])
  assert webdataset.expand_braces('s-{000008..000011}.tar') == [
      f's-0000{i:02d}.tar' for i in range(8, 12)]
  assert webdataset.expand_braces('{a,b}{1..2}') == ['a1', 'a2', 'b1', 'b2']
  assert webdataset.shard_files(f'{shards}/{{00000..00003}}.tar') == data['paths']
  assert webdataset.shard_files(f'{shards}/*.tar') == data['paths']
  assert webdataset.shard_files(
      f'{shards}/{{00002,00000}}.tar,{data["single"][0]}') == sorted(
          [data['paths'][0], data['paths'][2], data['single'][0]])
  with pytest.raises(ValueError, match=r"webdataset_pattern=.*1 of the 2 listed shards"):
    webdataset.shard_files(f'{shards}/{{00003..00004}}.tar')
  with pytest.raises(ValueError, match='matches no files'):
    webdataset.shard_files(f'{shards}/*.tgz')


# --- The training stream. -------------------------------------------------------------------------


def test_every_sample_once_per_epoch_and_drops_counted(data, tokenizer):
  """One host, shuffled: each epoch holds every good sample once; `dropped` is the number of
  bad samples among the raw stream's first `position` samples."""
  config = _config(','.join(data['paths']))
  epoch = len(GOOD) // 3
  batches = _take(config, tokenizer, 2 * epoch)   # 27 good samples: 9 batches per epoch.
  ids = [sum((_ids(tokenizer, b) for b in batches[e * epoch:(e + 1) * epoch]), [])
         for e in (0, 1)]
  assert sorted(ids[0]) == sorted(ids[1]) == GOOD
  assert ids[0] != ids[1]
  raw = _raw_keys(config, n=2 * N)
  assert sorted(raw[:N]) == sorted(raw[N:]) == list(range(N)) and raw[:N] != raw[N:]
  for k, batch in enumerate(batches):
    position = batch['position']
    assert batch['dropped'] == sum(i in BAD for i in raw[:position]) == position - 3 * (k + 1)
  assert batches[-1]['position'] > N and batches[-1]['dropped'] > len(BAD)   # Both epochs'.
  assert tokenizer.decode(batches[0]['text']) == [data['captions'][i]
                                                  for i in _ids(tokenizer, batches[0])]
  assert batches[0]['image'].shape == (3, 32, 32, 3) and batches[0]['image'].dtype == np.uint8


def test_json_caption(data, tokenizer):
  """Captions from the .json's 'caption': as a fallback for a sample without .txt, or always
  (webdataset_text_ext=''), when samples 10 (no .txt) and 13 (a blank .txt) are good."""
  fmt = webdataset.Format(('jpg',), ('txt',), 'caption')
  assert fmt.caption({'txt': b'a', 'json': b'{"caption": "b"}'}) == b'a'
  assert fmt.caption({'json': b'{"caption": "b"}'}) == b'b'
  assert fmt.caption({'json': b'[1]'}) is None and fmt.caption({'json': b'{"x'}) is None
  assert fmt.caption({'json': b'{"caption": 7}'}) is None
  good = sorted(GOOD + [10, 13])
  config = _config(','.join(data['paths']), batch_size=1, shuffle_buffer=0,
                   webdataset_text_ext='', webdataset_json_caption='caption')
  batches = _take(config, tokenizer, len(good))
  assert sorted(_ids(tokenizer, b)[0] for b in batches) == good
  raw = _raw_keys(config)
  assert batches[-1]['dropped'] == sum(i in (3, 7, 18) for i in raw[:batches[-1]['position']])


@pytest.mark.parametrize('kind', ['by_file', 'by_example'])
def test_two_hosts_read_disjoint_samples_whose_union_is_the_data(data, tokenizer, kind):
  """4 shards: 2 per host; 1 shard: every other sample. One epoch of each host's stream."""
  paths = data['paths'] if kind == 'by_file' else data['single']
  config = _config(','.join(paths), batch_size=2)
  ids, raws = [], []
  for p in (0, 1):
    raw = _raw_keys(config, p, 2, n=N // 2)   # The host's epoch: 16 samples.
    raws.append(raw)
    good = [i for i in raw if i not in BAD]
    batches = _take(config, tokenizer, len(good), process_index=p, process_count=2)
    ids.append([_ids(tokenizer, b)[0] for b in batches])
    assert sorted(ids[-1]) == sorted(good)
    assert batches[-1]['dropped'] == sum(i in BAD for i in raw[:batches[-1]['position']])
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == GOOD
  if kind == 'by_example':
    assert set(raws[0]) == set(range(0, N, 2))
  else:
    assert set(raws[0]) == set(range(0, 8)) | set(range(16, 24))


@pytest.mark.parametrize('process_index,process_count,resampled', [
    (0, 1, False), (1, 2, False), (0, 1, True)])
def test_resume_mid_stream_is_exact(data, tokenizer, process_index, process_count, resampled):
  """Restarting at a batch's cursor yields exactly the batches that followed (in the second
  epoch, or resampled block); the 2-host case shards the single shard by example."""
  paths = data['single'] if process_count == 2 else data['paths']
  config = _config(','.join(paths), batch_size=3 * process_count, resampled=resampled,
                   cycle_length=2)
  hosts = dict(process_index=process_index, process_count=process_count)
  full = _take(config, tokenizer, 14, **hosts)
  k = 10
  assert full[k]['position'] > (N // process_count if not resampled else 16)
  resumed = _take(config, tokenizer, 3, start_step=k + 1, start_position=full[k]['position'],
                  dropped=full[k]['dropped'], **hosts)
  for a, b in zip(resumed, full[k + 1:k + 4]):
    _assert_batches_equal(a, b)


def test_resampled_draws_shards_with_replacement_reproducibly(data, tokenizer):
  """Blocks of cycle_length shards drawn with replacement from (seed, host): the same stream
  twice, another for another host or seed; no epochs (some shard is drawn twice in a row of
  draws covering fewer than all shards)."""
  config = _config(','.join(data['paths']), resampled=True, cycle_length=2, shuffle_buffer=0)
  raw = _raw_keys(config, n=8 * N)
  assert raw == _raw_keys(config, n=8 * N)
  assert raw != _raw_keys(config, process_index=1, process_count=2, n=8 * N)
  config_seed = _config(','.join(data['paths']), resampled=True, cycle_length=2,
                        shuffle_buffer=0, seed=1)
  assert raw != _raw_keys(config_seed, n=8 * N)
  blocks = [sorted({i // 8 for i in raw[b * 16:(b + 1) * 16]}) for b in range(16)]
  assert any(len(b) == 1 for b in blocks)          # A shard drawn twice in one block.
  epochs = [sorted(raw[e * N:(e + 1) * N]) for e in range(8)]
  assert any(e != list(range(N)) for e in epochs)  # Not epochs of every sample once.


# --- Errors before training. ----------------------------------------------------------------------


def test_errors_name_the_field(data, tokenizer):
  shards = os.path.dirname(data['paths'][0])
  with pytest.raises(ValueError, match=r'config\.data\.webdataset_pattern=.*matches no files'):
    pipeline.make_train_iterator(_config(f'{shards}/*.tgz'), tokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.webdataset_image_ext='bmp'.*"
                     r"'jpg', 'json', 'parquet'|config\.data\.webdataset_image_ext='bmp'"):
    pipeline.make_train_iterator(_config(data['paths'][0], webdataset_image_ext='bmp'),
                                 tokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.webdataset_text_ext='caption'"):
    pipeline.make_train_iterator(_config(data['paths'][0], webdataset_text_ext='caption'),
                                 tokenizer)
  for fields, name in (({'webdataset_pattern': ' , '}, 'webdataset_pattern'),
                       ({'webdataset_image_ext': ';'}, 'webdataset_image_ext'),
                       ({'webdataset_text_ext': ''}, 'webdataset_text_ext'),
                       ({'resampled': 'yes'}, 'resampled')):
    config = _config(data['paths'][0])
    config.data = ml_collections.ConfigDict({**config.data.to_dict(), **fields})
    with pytest.raises(config_lib.ConfigError, match=rf'config\.data\.{name}='):
      config_lib.validate(config)
  config_lib.validate(_config(data['paths'][0], webdataset_text_ext='',
                              webdataset_json_caption='caption'))


def test_captions_for_the_tokenizer(data):
  captions = list(pipeline.caption_stream(_config(','.join(data['paths'])), 100))
  expected = [c for i, c in enumerate(data['captions']) if BAD.get(i) not in ('no_txt',
                                                                              'blank_caption')]
  assert sorted(captions) == sorted(expected)


# --- Training end to end. -------------------------------------------------------------------------


def _train_config(data, total_steps):
  config = _config(','.join(data['paths']), batch_size=8, cycle_length=2)
  config.total_steps, config.log_every_steps = total_steps, 1
  config.checkpoint_every_steps, config.eval_every_steps = 2, 4
  config.eval.zeroshot = False
  config.tokenizer.model_path = data['tokenizer_path']
  config.model.text.vocab_size = 128
  config.model.embed_dim = 32
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 32, 1, 2, 64
  return config


def _losses(workdir):
  return [r for r in metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r]


def test_train_two_steps_on_shards(data, tokenizer, tmp_path):
  """basic.train on the shards (bad samples mixed in): finite losses, a checkpoint, and the
  drops logged are those of the host stream's first two batches."""
  config = _train_config(data, 2)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = _losses(workdir)
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['train/loss']) for r in rows)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  expected = _take(config, tokenizer, 2)[-1]['dropped']
  assert rows[-1]['data/dropped'] == expected > 0


@pytest.mark.slow   # Three training runs (~1 min on 2 busy cores); the stream's resume is above.
def test_train_resumes_through_a_checkpoint_exactly(data, tmp_path):
  """Stopped at step 2 and run again to 4: every step's loss and drop count equal an
  uninterrupted 4-step run's."""
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(_train_config(data, 4), straight)
  train.train_and_evaluate(_train_config(data, 2), resumed)
  train.train_and_evaluate(_train_config(data, 4), resumed)
  rows = {w: _losses(w) for w in (straight, resumed)}
  assert [r['step'] for r in rows[resumed]] == [1, 2, 3, 4]
  for key in ('train/loss', 'data/dropped'):
    np.testing.assert_allclose([r[key] for r in rows[resumed]], [r[key] for r in rows[straight]],
                               rtol=1e-6)
  assert rows[straight][-1]['data/dropped'] > 0
