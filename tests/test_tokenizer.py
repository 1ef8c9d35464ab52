"""Tests for basic/tokenizer.py: SentencePiece training, in-graph tokenisation, caching."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from basic import config_defaults
from basic import tokenizer as tokenizer_lib
from basic.data.synthetic import ShapesDataset

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def captions():
  return ShapesDataset(0, 32, 10).captions(5000)


@pytest.fixture(scope='module')
def model_path(tmp_path_factory, captions):
  output = str(tmp_path_factory.mktemp('spm') / 'nested' / 'spm.model')
  assert tokenizer_lib.train(captions, 256, output) == output
  return output


def test_train_gives_exact_vocab_size(model_path):
  tok = tokenizer_lib.Tokenizer(model_path, 16)
  assert tok.vocab_size == 256
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)


def test_round_trip(model_path, captions):
  tok = tokenizer_lib.Tokenizer(model_path, 64)
  texts = captions[:40] + ['A RED Circle, in the Top Left.']
  ids = tok.encode(texts)
  assert ids.shape == (41, 64) and ids.dtype == np.int32
  assert (ids.max() < 256) and (ids.min() >= 0)
  assert tok.decode(ids) == [t.lower() for t in texts]


def test_padding_truncation_and_eos(model_path):
  long = ('an image showing a medium-sized blue circle near the lower left corner on a striped '
          'background')
  full = tokenizer_lib.Tokenizer(model_path, 64, add_eos=False).encode([long])[0]
  body = full[full != 0]
  assert len(body) > 8

  tok = tokenizer_lib.Tokenizer(model_path, 8)   # add_eos=True, add_bos=False.
  ids = tok.encode(['red', long])
  short = ids[0][ids[0] != 0]
  assert short[-1] == 3 and (ids[0][len(short):] == 0).all()   # ... EOS, then pad.
  np.testing.assert_array_equal(ids[1], np.append(body[:7], 3))  # Truncated: EOS kept last.

  bos = tokenizer_lib.Tokenizer(model_path, 8, add_bos=True).encode([long])[0]
  np.testing.assert_array_equal(bos, np.concatenate([[2], body[:6], [3]]))
  plain = tokenizer_lib.Tokenizer(model_path, 8, add_eos=False).encode([long])[0]
  np.testing.assert_array_equal(plain, body[:8])
  assert tok.decode(ids[1:])[0] == long[:len(tok.decode(ids[1:])[0])]

  with pytest.raises(ValueError, match='length'):
    tokenizer_lib.Tokenizer(model_path, 1)


def test_lowercase_flag(model_path):
  lower = tokenizer_lib.Tokenizer(model_path, 16)
  cased = tokenizer_lib.Tokenizer(model_path, 16, lowercase=False)
  np.testing.assert_array_equal(lower.encode(['A RED Circle']), lower.encode(['a red circle']))
  assert not np.array_equal(cased.encode(['A RED Circle']), cased.encode(['a red circle']))


def test_tf_tokenize_in_graph(model_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer(model_path, 12)
  texts = ['a red circle', 'there is a tiny blue square in the middle']
  ds = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(tok.tf_tokenize)
  assert ds.element_spec.shape.as_list() == [None, 12]
  assert ds.element_spec.dtype == tf.int32
  np.testing.assert_array_equal(next(ds.as_numpy_iterator()), tok.encode(texts))


def test_from_config(model_path):
  cfg = ml_collections.ConfigDict(dict(lowercase=True, add_bos=True, add_eos=False))
  tok = tokenizer_lib.Tokenizer.from_config(cfg, model_path, 10)
  assert (tok.length, tok.add_bos, tok.add_eos) == (10, True, False)


def test_cli(tmp_path, captions):
  text = tmp_path / 'captions.txt'
  text.write_text('\n'.join(captions[:2000]) + '\n')
  output = tmp_path / 'out' / 'cli.model'
  result = subprocess.run(
      [sys.executable, '-m', 'basic.tokenizer', 'train', f'--input={text}',
       '--vocab_size=100', f'--output={output}'],
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert tokenizer_lib.Tokenizer(str(output), 8).vocab_size == 100


def _config(**tokenizer):
  config = ml_collections.ConfigDict()
  config.data = dict(source='synthetic', image_size=32,
                     synthetic=dict(seed=0, num_heldout=10, eval_per_class=2))
  config.tokenizer = dict(model_path='', train_sentences=3000, lowercase=True)
  config.tokenizer.update(tokenizer)
  config.model = dict(text=dict(vocab_size=128))
  return config_defaults.fill(config)   # The other fields at their defaults.


def test_ensure_tokenizer_trains_once_and_caches(tmp_path):
  config = _config()
  path = tokenizer_lib.ensure_tokenizer(config, str(tmp_path))
  assert path == str(tmp_path / 'tokenizer' / 'spm.model')
  assert tokenizer_lib.Tokenizer(path, 8).vocab_size == 128
  mtime = os.stat(path).st_mtime_ns
  assert tokenizer_lib.ensure_tokenizer(config, str(tmp_path)) == path
  assert os.stat(path).st_mtime_ns == mtime   # Reused, not retrained.

  # A cached model larger than the configured vocabulary is an error, not silently used.
  config.model.text.vocab_size = 64
  with pytest.raises(ValueError, match='vocab_size'):
    tokenizer_lib.ensure_tokenizer(config, str(tmp_path))


def test_ensure_tokenizer_with_model_path(tmp_path, model_path):
  assert tokenizer_lib.ensure_tokenizer(_config(model_path=model_path), str(tmp_path)) == model_path
  assert not os.path.exists(tmp_path / 'tokenizer')
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.ensure_tokenizer(_config(model_path=str(tmp_path / 'missing.model')), '/tmp')
