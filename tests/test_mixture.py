"""Data source 'mixture' (basic/data/mixture.py): the composition rule against a plain
reference, fractions of a 0.7 / 0.3 mixture, exact resume of every component, disjoint hosts,
config errors naming the field, and basic.train through a checkpoint."""
import itertools
import os

import ml_collections
import numpy as np
import pytest

import data_helpers as helpers
from basic import checkpoint as checkpoint_lib
from basic import config_defaults
from basic import config_lib
from basic import metric_writers
from basic import tokenizer as tokenizer_lib
from basic import train
from basic.data import mixture
from basic.data import pipeline
from basic.data import synthetic
from configs import tiny

SIZE = 16                       # px of the training images here.
BAD = {1: 'garbage_image', 4: 'empty_caption', 6: 'no_image'}   # of the 9-record shard.
NUM_RECORDS = 9


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A 9-record shard with 3 bad records, 4 shards of 24 good ones, and a tokenizer."""
  root = tmp_path_factory.mktemp('mixture')
  bad, bad_captions = helpers.write_shards(str(root / 'bad'), NUM_RECORDS, 1, bad=BAD)
  shards, captions = helpers.write_shards(str(root / 'shards'), 24, 4)
  texts = bad_captions + captions + synthetic.ShapesDataset(0, SIZE, 10).captions(300)
  path = tokenizer_lib.train(texts * 2, 128, str(root / 'spm.model'))
  return dict(bad=bad, shards=shards, tokenizer_path=path)


@pytest.fixture(scope='module')
def tokenizer(data):
  return tokenizer_lib.Tokenizer(data['tokenizer_path'], 16)


def _config(batch_size, **components):
  """The tiny config with config.data.source='mixture' of `components` {name: fields}, filled."""
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.image_size = SIZE
  config.data.source = 'mixture'
  for name, fields in components.items():
    config.data.mixture[name] = ml_collections.ConfigDict(fields)
  return config_defaults.fill(config)


def _shapes(weight, seed=0):
  return dict(source='synthetic', weight=weight, synthetic=dict(seed=seed))


def _photos(paths, weight, **fields):
  return dict(source='tfrecord', weight=weight, tfrecord_pattern=','.join(paths), **fields)


def _host_batches(config, n, process_index=0, process_count=1):
  """n host batches of the mixture source (captions as strings, before tokenisation)."""
  handle = pipeline.check_source(config, process_index=process_index,
                                 process_count=process_count)
  ds = mixture.batches(config, handle, start_step=0, start_position=0,
                       local_batch=config.batch_size // process_count,
                       process_index=process_index, process_count=process_count)
  return list(ds.take(n).as_numpy_iterator())


# --- The composition rule. ------------------------------------------------------------------------


def _reference_counts(weights, batch_size, seed, step):
  """Plain loops: floor(B w_c) each, then the R leftover slots by systematic points u + r over
  consecutive intervals of length frac(B w_c), u the first uniform of (seed, step)."""
  rng = np.random.Generator(np.random.Philox(key=(seed, 7), counter=(0, step, 0, 0)))
  u = rng.random()
  quotas = [w / sum(weights) * batch_size for w in weights]
  counts = [int(q // 1) for q in quotas]
  leftover = batch_size - sum(counts)
  for r in range(leftover):
    point, start = u + r, 0.0
    for c, q in enumerate(quotas):
      end = start + (q - q // 1)
      if start <= point < end or c == len(quotas) - 1:
        counts[c] += 1
        break
      start = end
  return counts


@pytest.mark.parametrize('weights,batch_size', [((0.7, 0.3), 64), ((5, 3, 2), 7),
                                                ((0.7, 0.3), 1), ((1, 1, 1, 4), 100)])
def test_composition_counts_equal_the_reference_within_one_of_the_weights(weights, batch_size):
  w = np.array(weights, float) / sum(weights)
  totals = np.zeros(len(w))
  steps = 2000
  for step in range(steps):
    slots = mixture.composition(w, batch_size, 3, step)
    counts = np.bincount(slots, minlength=len(w))
    assert counts.tolist() == _reference_counts(weights, batch_size, 3, step)
    assert np.all(np.abs(counts - batch_size * w) < 1)
    totals += counts
  # E[n_c] = B w_c: over 2000 steps the mean is within 4 standard errors (<= 0.5 / sqrt(steps)).
  np.testing.assert_allclose(totals / steps, batch_size * w, atol=4 * 0.5 / np.sqrt(steps))
  np.testing.assert_array_equal(mixture.composition(w, batch_size, 3, 11),
                                mixture.composition(w, batch_size, 3, 11))
  assert not all(np.array_equal(mixture.composition(w, 64, 3, s), mixture.composition(w, 64, 4, s))
                 for s in range(3))


# --- The acceptance test: fractions over 10,000 examples. ----------------------------------------


def test_fractions_of_a_07_03_mixture_over_10000_examples():
  """Two synthetic streams (data seeds 0 and 1: every image differs) mixed 0.7 / 0.3 in batches
  of 64: each example is, by its pixels, the next example of one of the two streams (nothing
  skipped, repeated or reordered), and stream a's fraction of the first 10,000 is 0.7 +- 0.02."""
  config = _config(64, a=_shapes(0.7, seed=0), b=_shapes(0.3, seed=1))
  batches = _host_batches(config, 157)                               # 10,048 examples.
  images = np.concatenate([b['image'] for b in batches])[:10_000]
  expected = {name: synthetic.ShapesDataset(seed, SIZE, 10).train_examples(
      np.arange(8000 if name == 'a' else 4000))['image'] for name, seed in (('a', 0), ('b', 1))}
  taken = {'a': 0, 'b': 0}
  for image in images:
    name = next(n for n in ('a', 'b') if np.array_equal(image, expected[n][taken[n]]))
    taken[name] += 1
  fraction = taken['a'] / 10_000
  print(f'stream a: {taken["a"]} of 10,000 examples, fraction {fraction:.4f}')
  assert abs(fraction - 0.7) <= 0.02
  assert abs(fraction - 0.7) <= 0.002   # Stratified: the per-step counts are within 1 of B w.
  last = batches[155]['streams']        # After 156 batches: 9,984 examples.
  assert last[:, 0].tolist() == [sum(np.bincount(mixture.composition(
      mixture.normalised_weights(config), 64, 0, s), minlength=2)[c] for s in range(156))
      for c in (0, 1)]


# --- Resume, drops, hosts. ------------------------------------------------------------------------


def _take(config, tokenizer, n, **kwargs):
  iterator = pipeline.TrainIterator(config, tokenizer, **kwargs)
  return [{**batch, **iterator.state()} for batch in itertools.islice(iterator, n)]


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_resume_from_a_saved_cursor_is_exact(data, tokenizer, process_index, process_count):
  """Shapes and a shard with bad records, 0.6 / 0.4: after k batches, a fresh iterator restored
  from the cursor yields the batches of an uninterrupted run bit for bit, cursors included; the
  photos component's drops are the bad records among those it read."""
  config = _config(8 * process_count, shapes=_shapes(0.6),
                   photos=_photos(data['bad'], 0.4, shuffle_buffer=0))
  hosts = dict(process_index=process_index, process_count=process_count)
  full = _take(config, tokenizer, 8, **hosts)
  k = 3
  saved = {key: full[k - 1][key] for key in ('step', 'position', 'dropped', 'streams')}
  resumed = _take(config, tokenizer, 5, state=saved, **hosts)
  for a, b in zip(resumed, full[k:]):
    assert set(a) == set(b) == {'image', 'text', 'step', 'position', 'dropped', 'streams'}
    for key in ('image', 'text'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (a['step'], a['position'], a['dropped'], a['streams']) == (
        b['step'], b['position'], b['dropped'], b['streams'])
  photos = full[-1]['streams']['photos']
  # The one file is read in order (shuffle_buffer=0); host p of P keeps records p, p + P, ...
  records = [i for i in range(NUM_RECORDS * 10)
             if i % NUM_RECORDS % process_count == process_index][:photos['position']]
  assert photos['dropped'] == sum(i % NUM_RECORDS in BAD for i in records) > 0
  assert photos['step'] == photos['position'] - photos['dropped']
  assert full[-1]['dropped'] == photos['dropped']
  assert full[-1]['streams']['shapes'] == {'step': 8 * 8 - photos['step'],
                                           'position': 8 * 8 - photos['step'], 'dropped': 0}


def test_two_hosts_see_disjoint_examples(tmp_path):
  """Hosts 0 and 1 of 2: the shapes examples of host p are the stream's examples 2k + p, the
  photos (4 files, dealt 2 per host) of the two hosts are disjoint."""
  shards, _ = helpers.write_shards(str(tmp_path), 24, 4)
  config = _config(8, shapes=_shapes(0.5), photos=_photos(shards, 0.5))
  shapes = synthetic.ShapesDataset(0, SIZE, 10)
  ids = {}
  for p in (0, 1):
    batches = _host_batches(config, 4, p, 2)                       # 16 examples per host.
    slots = np.concatenate([mixture.composition(mixture.normalised_weights(config), 8, 0, s)[
        4 * p:4 * p + 4] for s in range(4)])
    images = np.concatenate([b['image'] for b in batches])
    captions = np.concatenate([b['caption'] for b in batches])
    k = int((slots == 1).sum())                                   # names sorted: photos 0.
    np.testing.assert_array_equal(images[slots == 1],
                                  shapes.train_examples(2 * np.arange(k) + p)['image'])
    ids[p] = {int(c.split()[1]) for c in captions[slots == 0]}
    assert len(ids[p]) == (slots == 0).sum() <= 12                # within one epoch of 12.
  assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_caption_stream_takes_each_component_by_weight(data):
  """The tokenizer's captions: round(n w_c) of each component's own caption stream, by name."""
  config = _config(8, shapes=_shapes(0.6), photos=_photos(data['shards'], 0.4))
  captions = list(pipeline.caption_stream(config, 10))
  photos = list(pipeline.caption_stream(mixture.component_config(config, 'photos'), 4))
  assert captions == photos + synthetic.ShapesDataset(0, SIZE, 10).captions(6)
  assert all(c.startswith('photo ') for c in captions[:4])


# --- Config errors. -------------------------------------------------------------------------------


@pytest.mark.parametrize('component,match', [
    (dict(source='tfrecord', weight=-1.0, tfrecord_pattern='x'),
     r'config\.data\.mixture\.b\.weight=-1\.0: must be a number > 0'),
    (dict(source='tfrecord', weight=0, tfrecord_pattern='x'),
     r'config\.data\.mixture\.b\.weight=0'),
    (dict(source='tfrecord', weight='a', tfrecord_pattern='x'),
     r'config\.data\.mixture\.b\.weight'),
    (dict(source='tfrecord', tfrecord_pattern='x'), r'config\.data\.mixture\.b\.weight: missing'),
    (dict(source='nope', weight=1.0), r"config\.data\.mixture\.b\.source='nope': must be one of"),
    (dict(source='mixture', weight=1.0), r"config\.data\.mixture\.b\.source='mixture'"),
    (dict(weight=1.0), r'config\.data\.mixture\.b\.source: missing'),
    (dict(source='tfrecord', weight=1.0), r"config\.data\.mixture\.b\.tfrecord_pattern='': must"),
    (dict(source='tfrecord', weight=1.0, tfrecord_pattern='x', cycle_length=0),
     r'config\.data\.mixture\.b\.cycle_length=0: must be an integer >= 1'),
    (dict(source='tfrecord', weight=1.0, tfrecord_pattern='x', tfds_name='y'),
     r"config\.data\.mixture\.b\.tfds_name='y': not a field of a 'tfrecord' component"),
    (dict(source='synthetic', weight=1.0, synthetic=dict(num_heldout=-2)),
     r'config\.data\.mixture\.b\.synthetic\.num_heldout=-2'),
])
def test_bad_components_fail_naming_the_field(component, match):
  config = _config(8, a=_shapes(1.0))
  config.data.mixture.b = ml_collections.ConfigDict(component, type_safe=False)
  config = config_defaults.fill(config)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_empty_mixture_and_missing_files_fail_naming_the_field(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.mixture=.*at least one'):
    config_lib.validate(_config(8))
  config = _config(8, a=_shapes(1.0), b=_photos([str(tmp_path / 'none*.tfrecord')], 1.0))
  config_lib.validate(config)
  with pytest.raises(ValueError, match=r'config\.data\.mixture\.b\.tfrecord_pattern=.* matches '
                     'no files'):
    pipeline.check_source(config)


def test_components_are_filled_with_their_sources_defaults():
  config = _config(8, a=_shapes(0.5), b=dict(source='tfrecord', weight=0.5,
                                             tfrecord_pattern='x'))
  assert config.data.mixture.a.synthetic.to_dict() == {'seed': 0, 'num_heldout': 10,
                                                       'eval_per_class': 50}
  assert config.data.mixture.b.shuffle_buffer == 10_000 and config.data.mixture.b.cache is False
  assert 'tfrecord_pattern' not in config.data.mixture.a
  assert config_lib.resume_rule('data.mixture.b.weight') == config_lib.ALLOWED
  assert config_lib.resume_rule('data.mixture.b.seed') == config_lib.FIXED


# --- Training. ------------------------------------------------------------------------------------


def test_checkpoint_item_round_trip_restores_every_component(data, tokenizer):
  """The checkpoint's data item (stream_item, one process) read back by host_cursor gives the
  iterator's cursor, components included, and a run resumed from it continues exactly."""
  config = _config(8, shapes=_shapes(0.6), photos=_photos(data['bad'], 0.4))
  full = _take(config, tokenizer, 4)
  item = checkpoint_lib.stream_item(
      {k: full[1][k] for k in ('step', 'position', 'dropped', 'streams')}, rng=[0, 1])
  assert item['streams'] == {n: {k: [v] for k, v in c.items()}
                             for n, c in full[1]['streams'].items()}
  cursor = checkpoint_lib.host_cursor(item, 2)
  assert cursor == {k: full[1][k] for k in ('step', 'position', 'dropped', 'streams')}
  for a, b in zip(_take(config, tokenizer, 2, state=cursor), full[2:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])
    assert a['streams'] == b['streams']


@pytest.mark.slow   # 61 s on a loaded 2-core machine (three short training runs).
def test_train_with_a_mixture_resumes_exactly_through_a_checkpoint(data, tmp_path):
  """basic.train on shapes + bad-record photos: 4 steps straight, and 2 then 2 more from the
  checkpoint: the same losses, drop counts (per component too) and component cursors."""
  def config_for(total_steps):
    config = _config(8, shapes=_shapes(0.5), photos=_photos(data['bad'], 0.5))
    config.total_steps, config.checkpoint_every_steps = total_steps, 2
    config.log_every_steps, config.eval_every_steps = 1, 4
    config.eval.zeroshot = False
    config.tokenizer.model_path = data['tokenizer_path']
    config.model.text.vocab_size = 128
    config.model.embed_dim = 16
    config.model.image.patch_size = 8
    for tower in (config.model.image, config.model.text):
      tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 16, 1, 2, 32
    return config

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config_for(4), straight)
  train.train_and_evaluate(config_for(2), resumed)
  train.train_and_evaluate(config_for(4), resumed)
  rows = {w: [r for r in metric_writers.read_jsonl(os.path.join(w, 'metrics.jsonl'))
              if 'train/loss' in r] for w in (straight, resumed)}
  assert [r['step'] for r in rows[resumed]] == [1, 2, 3, 4]
  for key in ('train/loss', 'data/dropped', 'data/dropped/photos', 'data/dropped/shapes'):
    np.testing.assert_allclose([r[key] for r in rows[resumed]], [r[key] for r in rows[straight]],
                               rtol=1e-6, err_msg=key)
  assert rows[straight][-1]['data/dropped/photos'] == rows[straight][-1]['data/dropped'] > 0
  items = [checkpoint_lib.Checkpointer(os.path.join(w, 'checkpoints'),
                                       read_only=True).restore_data(4) for w in (straight, resumed)]
  assert items[0]['streams'] == items[1]['streams']
  assert sum(items[0]['streams'][n]['step'][0] for n in ('photos', 'shapes')) == 4 * 8
