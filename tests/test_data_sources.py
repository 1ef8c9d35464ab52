"""The TFDS and TFRecord input pipeline: per-host sharding, bad records, exact resume, errors,
and 2 training steps from each source (basic/data/pipeline.py, basic/data/sources.py)."""
import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import data_helpers as helpers
from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import metric_writers
from basic import tokenizer as tokenizer_lib
from basic import train
from basic.data import pipeline
from basic.data import sources
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = helpers.NUM_EXAMPLES   # 24 records in each data set below.
# The bad-record shard: 27 records, 9 of them bad (one of each kind), the last one good.
BAD = {2: 'garbage_image', 5: 'truncated_jpeg', 6: 'empty_caption', 9: 'blank_caption',
       11: 'no_caption', 15: 'int_caption', 17: 'float_image', 20: 'no_image',
       24: 'empty_image'}
NUM_BAD_SHARD = 27


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Shards and TFDS data sets on disk, and a tokenizer that knows their captions."""
  root = tmp_path_factory.mktemp('data')
  shards, captions = helpers.write_shards(str(root / 'shards'), N, 4, png_every=5)
  single, _ = helpers.write_shards(str(root / 'single'), N, 1)
  bad, bad_captions = helpers.write_shards(str(root / 'bad'), NUM_BAD_SHARD, 1, bad=BAD)
  tfds_dir = str(root / 'tfds')
  names = {cls: helpers.prepare(cls, tfds_dir)
           for cls in (helpers.BasicTestCaptions, helpers.BasicTestMultiCaptions)}
  _, class_names = helpers.images_and_names(NUM_BAD_SHARD)
  texts = bad_captions + [helpers.multi_caption(i, k, class_names)
                          for i in range(N) for k in range(helpers.NUM_CAPTIONS)]
  path = tokenizer_lib.train(texts * 4, 128, str(root / 'spm.model'))
  return dict(root=root, shards=shards, single=single, bad=bad, captions=captions,
              bad_captions=bad_captions, tfds_dir=tfds_dir,
              single_tfds=names[helpers.BasicTestCaptions],
              multi_tfds=names[helpers.BasicTestMultiCaptions], tokenizer_path=path)


@pytest.fixture(scope='module')
def tokenizer(data):
  return tokenizer_lib.Tokenizer(data['tokenizer_path'], 16)


def _config(batch_size=4, **data):
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.update(data)
  return config


def _tfrecord(paths, batch_size=4, **data):
  return _config(batch_size, source='tfrecord', tfrecord_pattern=','.join(paths), **data)


def _tfds(data, name, batch_size=4, **fields):
  return _config(batch_size, source='tfds', tfds_name=data[name], data_dir=data['tfds_dir'],
                 **fields)


def _take(config, tokenizer, n, **kwargs):
  """n batches, each with the iterator's cursor after it ('step', 'position', 'dropped')."""
  iterator = pipeline.make_train_iterator(config, tokenizer, **kwargs)
  return [{**batch, **iterator.state()} for batch in itertools.islice(iterator, n)]


def _ids(tokenizer, batch):
  """The example index i of each row, from its decoded caption 'photo {i} ...'."""
  return [int(text.split()[1]) for text in tokenizer.decode(batch['text'])]


def _assert_batches_equal(a, b):
  assert set(a) == set(b) == {'image', 'text', 'step', 'position', 'dropped'}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_tfrecord_batches_cover_every_example_once_per_epoch(data, tokenizer):
  batches = _take(_tfrecord(data['shards']), tokenizer, 12)   # 2 epochs of 6 batches.
  first = batches[0]
  assert first['image'].shape == (4, 32, 32, 3) and first['image'].dtype == np.uint8
  assert first['text'].shape == (4, 16) and first['text'].dtype == np.int32
  assert isinstance(first['position'], int)
  assert [int(b['position']) for b in batches] == list(range(4, 49, 4))
  assert [int(b['dropped']) for b in batches] == [0] * 12
  epochs = [sum((_ids(tokenizer, b) for b in batches[e * 6:(e + 1) * 6]), []) for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
  assert epochs[0] != epochs[1]   # Reshuffled per epoch.
  assert tokenizer.decode(first['text']) == [data['captions'][i] for i in _ids(tokenizer, first)]


def test_bad_records_are_dropped_and_counted(data, tokenizer):
  """No shuffling: the batches are the good records in file order; dropped counts the rest."""
  config = _tfrecord(data['bad'], batch_size=6, shuffle_buffer=0)
  batches = _take(config, tokenizer, 6)   # 2 epochs of 18 good records.
  good = [i for i in range(NUM_BAD_SHARD) if i not in BAD]
  assert len(good) == 18
  for k, batch in enumerate(batches):
    epoch, j = divmod(k, 3)
    assert _ids(tokenizer, batch) == good[j * 6:(j + 1) * 6]
    position = epoch * NUM_BAD_SHARD + good[j * 6 + 5] + 1
    assert int(batch['position']) == position
    assert int(batch['dropped']) == position - 6 * (k + 1)
  assert [int(b['dropped']) for b in batches] == [3, 7, 9, 12, 16, 18]


def test_drop_count_with_shuffling_matches_the_raw_stream(data, tokenizer):
  config = _tfrecord(data['bad'], batch_size=6)
  batches = _take(config, tokenizer, 3)
  host = pipeline.check_source(config)
  raw = sources.epoch_records(host, seed=0, shuffle_buffer=config.data.shuffle_buffer,
                              cycle_length=16, cache=False).take(NUM_BAD_SHARD)
  keys = []
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for record in raw.as_numpy_iterator():
    keys.append(int(tf.train.Example.FromString(record).features.feature['key']
                    .bytes_list.value[0]))
  assert sorted(keys) == list(range(NUM_BAD_SHARD)) and keys != sorted(keys)
  position = int(batches[-1]['position'])
  assert int(batches[-1]['dropped']) == sum(k in BAD for k in keys[:position]) == position - 18
  assert sorted(sum((_ids(tokenizer, b) for b in batches), [])) == sorted(
      k for k in keys[:position] if k not in BAD)


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_resume_is_exact_tfrecord(data, tokenizer, process_index, process_count):
  """Resuming at a batch's position gives exactly the batches that followed it (2 files plus
  the bad-record shard: file-sharded for 1 host, example-sharded for 2)."""
  config = _tfrecord(data['shards'][:2] + data['bad'], batch_size=4 * process_count)
  hosts = dict(process_index=process_index, process_count=process_count)
  full = _take(config, tokenizer, 16, **hosts)   # An epoch is 12 + 18 good records (/ hosts).
  k = 3 if process_count == 1 else 11    # In the first epoch; in the third.
  resumed = _take(config, tokenizer, 4, start_step=k + 1,
                  start_position=int(full[k]['position']), **hosts)
  for a, b in zip(resumed, full[k + 1:k + 5]):
    _assert_batches_equal(a, b)


def test_resume_is_exact_tfds(data, tokenizer):
  config = _tfds(data, 'multi_tfds', text_key='captions/text')
  full = _take(config, tokenizer, 14)   # 6 batches per epoch.
  k = 8                                  # Resume in the second epoch.
  resumed = _take(config, tokenizer, 5, start_step=k + 1, start_position=int(full[k]['position']))
  for a, b in zip(resumed, full[k + 1:k + 6]):
    _assert_batches_equal(a, b)


def _host_epoch_ids(config, tokenizer, process_index):
  """This host's example ids over one epoch of its stream (batch size 1 per host)."""
  host = pipeline.check_source(config, process_index=process_index, process_count=2)
  per_epoch = sources.count_records(host)
  batches = pipeline.make_train_iterator(config, tokenizer, process_index=process_index,
                                         process_count=2)
  return [_ids(tokenizer, b)[0] for b in itertools.islice(batches, per_epoch)]


@pytest.mark.parametrize('kind', ['tfrecord_by_file', 'tfrecord_by_example', 'tfds'])
def test_two_hosts_get_disjoint_examples_whose_union_is_the_dataset(data, tokenizer, kind):
  if kind == 'tfrecord_by_file':
    config = _tfrecord(data['shards'], batch_size=2)        # 4 files: 2 per host.
  elif kind == 'tfrecord_by_example':
    config = _tfrecord(data['single'], batch_size=2)        # 1 file: every other record.
  else:
    config = _tfds(data, 'single_tfds', batch_size=2)        # Half the split each.
  ids = [_host_epoch_ids(config, tokenizer, p) for p in (0, 1)]
  assert len(ids[0]) == len(ids[1]) == N // 2
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(N))


def test_cache_keeps_every_example_once_per_epoch_and_exact_resume(data, tokenizer):
  config = _tfrecord(data['shards'], cache=True)
  full = _take(config, tokenizer, 12)
  for e in (0, 1):
    assert sorted(sum((_ids(tokenizer, b) for b in full[e * 6:(e + 1) * 6]), [])) == list(
        range(N))
  resumed = _take(config, tokenizer, 3, start_step=8, start_position=int(full[7]['position']))
  for a, b in zip(resumed, full[8:11]):
    _assert_batches_equal(a, b)


def test_unreadable_rest_of_a_tfrecord_file_is_skipped(data, tmp_path):
  """A shard cut in the middle of a record: its records before the cut are read, the other
  shards in full, and the stream goes on."""
  paths, captions = helpers.write_shards(str(tmp_path), N, 2)
  with open(paths[1], 'rb') as f:
    content = f.read()
  with open(paths[1], 'wb') as f:
    f.write(content[:len(content) * 6 // 10])
  read = list(pipeline.caption_stream(_tfrecord(paths), 100))
  first, second = set(captions[:N // 2]), [c for c in read if c not in captions[:N // 2]]
  assert first <= set(read) and 0 < len(second) < N // 2
  assert set(second) == set(captions[N // 2:N // 2 + len(second)])   # A prefix of the shard.


def test_tfds_list_of_captions_one_sampled_per_example_per_epoch(data, tokenizer):
  config = _tfds(data, 'multi_tfds', text_key='captions/text')
  _, names = helpers.images_and_names(N)
  batches = _take(config, tokenizer, 24)   # 4 epochs of 6 batches.
  chosen = {}   # (epoch, example) -> caption number
  for k, batch in enumerate(batches):
    for i, text in zip(_ids(tokenizer, batch), tokenizer.decode(batch['text'])):
      options = [helpers.multi_caption(i, c, names) for c in range(helpers.NUM_CAPTIONS)]
      assert text in options
      assert (k // 6, i) not in chosen   # Each example once per epoch.
      chosen[(k // 6, i)] = options.index(text)
  assert len(chosen) == 4 * N
  per_example = [{chosen[(e, i)] for e in range(4)} for i in range(N)]
  assert sum(len(s) > 1 for s in per_example) >= N // 2   # Re-drawn each epoch.
  assert set(chosen.values()) == set(range(helpers.NUM_CAPTIONS))


def test_tfds_single_caption_default_keys(data, tokenizer):
  batches = _take(_tfds(data, 'single_tfds'), tokenizer, 6)
  assert sorted(sum((_ids(tokenizer, b) for b in batches), [])) == list(range(N))
  assert int(batches[-1]['position']) == N and int(batches[-1]['dropped']) == 0


def test_augmentation_follows_the_config(data, tokenizer):
  """Whole-image crops with flips: an example's image in one epoch is its image of another
  epoch or that mirrored, and both happen."""
  config = _tfrecord(data['single'], batch_size=24)
  config.data.augment.update(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True))
  epochs = [b['image'][np.argsort(_ids(tokenizer, b))] for b in _take(config, tokenizer, 2)]
  same = [np.array_equal(a, b) for a, b in zip(*epochs)]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(*epochs)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 0 < sum(mirrored) < N and 0 < sum(same) < N


# --- Errors before training. --------------------------------------------------------------------


def test_pattern_matching_nothing_is_an_error(data, tokenizer):
  missing = str(data['root'] / 'nowhere' / '*.tfrecord')
  for pattern in (missing, f'{data["shards"][0]},{missing}'):
    with pytest.raises(ValueError, match=r'config\.data\.tfrecord_pattern') as e:
      pipeline.make_train_iterator(_tfrecord([pattern]), tokenizer)
    assert missing in str(e.value) and 'matches no files' in str(e.value)


def test_missing_or_wrong_feature_key_is_an_error(data, tokenizer):
  with pytest.raises(ValueError, match=r"config\.data\.text_key='caption'.*txt") as e:
    pipeline.make_train_iterator(_tfrecord(data['shards'], text_key='caption'), tokenizer)
  assert 'jpg' in str(e.value)
  with pytest.raises(ValueError, match=r"config\.data\.image_key='width'.*not bytes"):
    pipeline.make_train_iterator(_tfrecord(data['shards'], image_key='width'), tokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.text_key='caption'.*captions/text"):
    pipeline.make_train_iterator(_tfds(data, 'multi_tfds'), tokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.image_key='id'.*int64"):
    pipeline.make_train_iterator(_tfds(data, 'single_tfds', image_key='id'), tokenizer)


def test_unknown_tfds_name_or_split_is_an_error(data, tokenizer):
  config = _tfds(data, 'single_tfds')
  config.data.tfds_name = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match=r"config\.data\.tfds_name='no_such_dataset_xyz'"):
    pipeline.make_train_iterator(config, tokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.tfds_split='validation'"):
    pipeline.make_train_iterator(_tfds(data, 'single_tfds', tfds_split='validation'), tokenizer)


@pytest.mark.parametrize('field,value', [
    ('data.tfrecord_pattern', ''),
    ('data.augment.crop_scale', (0.5, 1.5)),
    ('data.augment.crop_ratio', (4 / 3, 3 / 4)),
    ('data.augment.erasing_prob', 2.0),
    ('data.cycle_length', 0),
    ('data.shuffle_buffer', -1),
    ('data.resize_method', 'cubic'),
])
def test_config_validation_names_the_data_field(field, value):
  config = _config(source='tfrecord', tfrecord_pattern='/data/*.tfrecord')
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{field}='):
    config_lib.validate(config)
  config = _config(source='tfds')
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.tfds_name'):
    config_lib.validate(config)


# --- Captions for the tokenizer. ----------------------------------------------------------------


def test_caption_stream(data):
  captions = list(pipeline.caption_stream(_tfrecord(data['bad']), 100))
  # Records without a non-empty caption, or with a non-text one, give none; bad images do.
  expected = [c for i, c in enumerate(data['bad_captions'])
              if BAD.get(i) not in ('empty_caption', 'blank_caption', 'no_caption',
                                    'int_caption')]
  assert sorted(captions) == sorted(expected) and len(expected) == 23
  assert len(list(pipeline.caption_stream(_tfrecord(data['bad']), 5))) == 5
  multi = list(pipeline.caption_stream(_tfds(data, 'multi_tfds', text_key='captions/text'), 999))
  assert len(multi) == len(set(multi)) == N * helpers.NUM_CAPTIONS


@pytest.mark.slow   # A fresh process (~10 s of imports); caption_stream + train are tested above.
def test_tokenizer_cli_from_a_config(data, tmp_path):
  output = tmp_path / 'spm.model'
  result = subprocess.run(
      [sys.executable, '-m', 'basic.tokenizer', 'train', '--config=configs/tiny.py',
       '--config.data.source=tfds', f'--config.data.tfds_name={data["multi_tfds"]}',
       f'--config.data.data_dir={data["tfds_dir"]}', '--config.data.text_key=captions/text',
       '--sentences=60', '--vocab_size=64', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert tokenizer_lib.Tokenizer(str(output), 8).vocab_size == 64


# --- Two training steps from each source (the real train entry point). --------------------------


def _train_config(config, data):
  config.batch_size, config.microbatch_size = 8, 8
  config.total_steps, config.log_every_steps = 2, 1
  config.eval_every_steps = config.checkpoint_every_steps = 2
  config.eval.zeroshot = False
  config.tokenizer.model_path = data['tokenizer_path']
  config.model.text.vocab_size = 128
  config.model.embed_dim = 32
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 32, 1, 2, 64
  return config


@pytest.mark.parametrize('source', ['tfds', 'tfrecord'])
def test_train_two_steps(data, tokenizer, tmp_path, source):
  """basic.train from a TFDS data set by name, and from shards with bad records mixed in."""
  if source == 'tfds':
    config = _tfds(data, 'multi_tfds', text_key='captions/text')
  else:
    config = _tfrecord(data['bad'])
  config = _train_config(config, data)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in losses] == [1, 2]
  assert all(np.isfinite(r['train/loss']) for r in losses)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  # The drops logged at step 2 are those of this host's stream up to the second batch.
  expected = int(_take(config, tokenizer, 2)[-1]['dropped'])
  assert (expected > 0) == (source == 'tfrecord')
  assert [r['data/dropped'] for r in rows if 'data/dropped' in r][-1] == expected


def test_resume_through_a_checkpoint_is_exact_with_bad_records(data, tmp_path):
  """train_and_evaluate from shards with bad records, stopped at step 3 and run again to 6:
  the checkpoint's stream position brings back the same batches, so every step's loss, the
  drop count and the final parameters equal an uninterrupted 6-step run. The tokenizer is
  trained on first use from the source's own captions (config.tokenizer.model_path empty)."""
  def config_for(total_steps):
    config = _train_config(_tfrecord(data['bad']), data)
    config.total_steps, config.checkpoint_every_steps = total_steps, 3
    config.eval_every_steps = 6
    config.tokenizer.model_path = ''
    config.tokenizer.train_sentences = 200
    return config

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config_for(6), straight)
  train.train_and_evaluate(config_for(3), resumed)
  train.train_and_evaluate(config_for(6), resumed)
  rows = {w: [r for r in metric_writers.read_jsonl(os.path.join(w, 'metrics.jsonl'))
              if 'train/loss' in r] for w in (straight, resumed)}
  assert [r['step'] for r in rows[resumed]] == [1, 2, 3, 4, 5, 6]
  for key in ('train/loss', 'data/dropped'):
    np.testing.assert_allclose([r[key] for r in rows[resumed]], [r[key] for r in rows[straight]],
                               rtol=1e-6)
  assert rows[straight][-1]['data/dropped'] > 0
  assert os.path.exists(os.path.join(straight, 'tokenizer', 'spm.model'))
  ckpts = [checkpoint_lib.Checkpointer(os.path.join(w, 'checkpoints'), read_only=True)
           for w in (straight, resumed)]
  assert ckpts[0].restore_data(6)['positions'] == ckpts[1].restore_data(6)['positions']
  a, b = (c.restore_params(6) for c in ckpts)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
