"""Tests for basic/data/pipeline.py: per-host, deterministic, resumable tf.data batches."""
import importlib.util
import itertools
import os

import numpy as np
import pytest

import basic.data
from basic import tokenizer as tokenizer_lib
from basic.data import pipeline
from basic.data import synthetic

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  spec = importlib.util.spec_from_file_location('tiny', os.path.join(_REPO, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  config = _tiny_config()
  config.tokenizer.train_sentences = 3000
  path = tokenizer_lib.ensure_tokenizer(config, str(tmp_path_factory.mktemp('workdir')))
  return tokenizer_lib.Tokenizer.from_config(config.tokenizer, path, config.data.text_length)


def _small_config(batch_size=16):
  config = _tiny_config()
  config.batch_size = batch_size
  return config


def _take(iterator, n):
  """n batches, each with the iterator's cursor after it ('step', 'position', 'dropped')."""
  return [{**batch, **iterator.state()} for batch in itertools.islice(iterator, n)]


def test_batch_shapes_and_dtypes(tokenizer):
  config = _tiny_config()
  batches = pipeline.make_train_iterator(config, tokenizer)
  batch = next(batches)
  size, length = config.data.image_size, config.data.text_length
  assert set(batch) == {'image', 'text'}      # The cursor is the iterator's: state().
  assert batches.state() == {'step': 1, 'position': config.batch_size, 'dropped': 0}
  assert batch['image'].shape == (config.batch_size, size, size, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['text'].shape == (config.batch_size, length)
  assert batch['text'].dtype == np.int32
  assert (batch['text'][:, 0] != tokenizer.pad_id).all()
  assert ((batch['text'] == tokenizer.eos_id).sum(1) == 1).all()


def test_batches_are_the_dataset_examples(tokenizer):
  config = _small_config()
  batches = _take(pipeline.make_train_iterator(config, tokenizer), 2)
  examples = synthetic.ShapesDataset.from_config(config.data).train_examples(np.arange(16, 32))
  np.testing.assert_array_equal(batches[1]['image'], examples['image'])
  np.testing.assert_array_equal(batches[1]['text'], tokenizer.encode(list(examples['caption'])))
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])


def test_batches_rendered_in_pieces_are_the_same(tokenizer, monkeypatch):
  """A batch larger than the rendering piece (synthetic._RENDER_CHUNK, 4096; 5 here) is the
  dataset's examples exactly, a piece boundary inside it."""
  monkeypatch.setattr(synthetic, '_RENDER_CHUNK', 5)
  config = _small_config()
  batch = _take(pipeline.make_train_iterator(config, tokenizer, start_step=1), 1)[0]
  examples = synthetic.ShapesDataset.from_config(config.data).train_examples(np.arange(16, 32))
  np.testing.assert_array_equal(batch['image'], examples['image'])
  np.testing.assert_array_equal(batch['text'], tokenizer.encode(list(examples['caption'])))


def test_deterministic_and_resumable(tokenizer):
  config = _small_config()
  fresh = _take(pipeline.make_train_iterator(config, tokenizer), 5)
  again = _take(pipeline.make_train_iterator(config, tokenizer), 5)
  # Synthetic streams resume by step; start_position is ignored.
  resumed = _take(pipeline.make_train_iterator(config, tokenizer, start_step=3,
                                               start_position=12345), 2)
  for a, b in zip(fresh, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])
  for step, batch in zip((3, 4), resumed):
    np.testing.assert_array_equal(batch['image'], fresh[step]['image'])
    np.testing.assert_array_equal(batch['text'], fresh[step]['text'])
  # position = examples of this host's stream through the batch; nothing is ever dropped.
  assert [int(b['position']) for b in fresh] == [16, 32, 48, 64, 80]
  assert [int(b['position']) for b in resumed] == [64, 80]
  assert all(b['dropped'] == 0 and isinstance(b['position'], int) for b in fresh)
  # restore() continues after any saved cursor.
  iterator = pipeline.make_train_iterator(config, tokenizer)
  iterator.restore(fresh[2])
  for step in (3, 4):
    np.testing.assert_array_equal(next(iterator)['image'], fresh[step]['image'])
  assert iterator.state() == {'step': 5, 'position': 80, 'dropped': 0}


def test_hosts_slices_concatenate_to_the_global_batch(tokenizer):
  config = _small_config()
  whole = _take(pipeline.make_train_iterator(config, tokenizer, start_step=7), 2)
  hosts = [_take(pipeline.make_train_iterator(config, tokenizer, start_step=7, process_index=p,
                                              process_count=2), 2) for p in range(2)]
  for step in range(2):
    assert hosts[0][step]['image'].shape[0] == 8
    for key in ('image', 'text'):
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), whole[step][key])
    assert int(hosts[1][step]['position']) == (7 + step + 1) * 8


def test_bad_arguments_raise(tokenizer):
  assert basic.data.SOURCES.names()[:3] == ('synthetic', 'tfds', 'tfrecord')
  config = _small_config()
  config.data.source = 'laion'
  with pytest.raises(ValueError, match='data.source'):
    pipeline.make_train_iterator(config, tokenizer)
  config.data.source = 'tfds'
  with pytest.raises(ValueError, match=r'config\.data\.tfds_name'):
    pipeline.make_train_iterator(config, tokenizer)
  with pytest.raises(ValueError, match='data.source'):   # Zero-shot over TFDS: not here yet.
    pipeline.make_zeroshot_data(config)
  with pytest.raises(ValueError, match='process_count'):
    pipeline.make_train_iterator(_small_config(batch_size=10), tokenizer, process_count=3)
  with pytest.raises(ValueError, match='start_position'):
    pipeline.make_train_iterator(_small_config(), tokenizer, start_position=-1)


def test_caption_stream_synthetic():
  config = _small_config()
  expected = synthetic.ShapesDataset.from_config(config.data).captions(7)
  assert list(pipeline.caption_stream(config, 7)) == expected


def test_zeroshot_data(tokenizer):
  config = _tiny_config()
  data = pipeline.make_zeroshot_data(config, tokenizer)
  dataset = synthetic.ShapesDataset.from_config(config.data)
  n = config.data.synthetic.eval_per_class * config.data.synthetic.num_heldout
  assert data['images'].shape == (n, 32, 32, 3) and data['images'].dtype == np.uint8
  assert data['labels'].shape == (n,) and data['labels'].dtype == np.int32
  assert data['class_names'] == dataset.class_names and len(data['class_names']) == 48
  assert set(data['labels']) == set(dataset.heldout_classes)
  assert data['templates'] == synthetic.ZEROSHOT_TEMPLATES
  tokens = data['prompt_tokens']
  assert tokens.shape == (48, len(data['templates']), config.data.text_length)
  np.testing.assert_array_equal(
      tokens[5, 0], tokenizer.encode([data['templates'][0].format(data['class_names'][5])])[0])
  seen = pipeline.make_zeroshot_data(config, split='seen')
  assert set(seen['labels']) == set(dataset.train_classes) and 'prompt_tokens' not in seen
