"""Tests for basic/data/synthetic.py: the coloured-shapes data set."""
import re

import ml_collections
import numpy as np
import pytest

from basic.data import synthetic
from basic.data.synthetic import ShapesDataset

_COLOUR_WORDS = {w: c for c, ws in synthetic.COLOUR_SYNONYMS.items() for w in ws}
_SHAPE_WORDS = {w: s for s, ws in synthetic.SHAPE_SYNONYMS.items() for w in ws}


def _word_pattern(words):
  # Longest first, so that "plus sign" wins over "plus"; whole words only.
  alternatives = '|'.join(re.escape(w) for w in sorted(words, key=len, reverse=True))
  return re.compile(rf'\b(?:{alternatives})\b')


_COLOUR_RE, _SHAPE_RE = _word_pattern(_COLOUR_WORDS), _word_pattern(_SHAPE_WORDS)


def _mentions(caption, pattern, words):
  return {words[w] for w in pattern.findall(caption.lower())}


def _parse(caption):
  """The (colour, shape) class a caption describes; asserts it names exactly one of each."""
  colours = _mentions(caption, _COLOUR_RE, _COLOUR_WORDS)
  shapes = _mentions(caption, _SHAPE_RE, _SHAPE_WORDS)
  assert len(colours) == 1 and len(shapes) == 1, caption
  colour, shape = colours.pop(), shapes.pop()
  return synthetic.COLOURS.index(colour) * synthetic.NUM_SHAPES + synthetic.SHAPES.index(shape)


@pytest.fixture(scope='module')
def dataset():
  return ShapesDataset(seed=0, image_size=32, num_heldout=10)


def test_classes_and_documented_heldout(dataset):
  assert len(dataset.class_names) == 48
  assert dataset.class_names[0] == 'red circle'
  assert dataset.class_names[2 * synthetic.NUM_SHAPES + 5] == 'blue ring'
  heldout = [dataset.class_names[i] for i in dataset.heldout_classes]
  assert heldout == ['red circle', 'green square', 'blue triangle', 'yellow cross',
                     'purple diamond', 'orange ring', 'white circle', 'cyan square',
                     'red square', 'green triangle']
  np.testing.assert_array_equal(
      np.sort(np.concatenate([dataset.heldout_classes, dataset.train_classes])), np.arange(48))


def test_from_config():
  data = ml_collections.ConfigDict(dict(
      image_size=24, synthetic=dict(seed=3, num_heldout=7, eval_per_class=2)))
  ds = ShapesDataset.from_config(data)
  assert (ds.seed, ds.image_size, len(ds.heldout_classes)) == (3, 24, 7)


@pytest.mark.parametrize('num_heldout', [0, 10, 25, synthetic.MAX_HELDOUT])
def test_every_colour_and_shape_keeps_a_training_partner(num_heldout):
  train = ShapesDataset(0, 32, num_heldout).train_classes
  assert set(train // synthetic.NUM_SHAPES) == set(range(synthetic.NUM_COLOURS))
  assert set(train % synthetic.NUM_SHAPES) == set(range(synthetic.NUM_SHAPES))


def test_too_many_heldout_raises():
  with pytest.raises(ValueError, match='num_heldout'):
    ShapesDataset(0, 32, synthetic.MAX_HELDOUT + 1)


def test_deterministic_and_indexable(dataset):
  a = dataset.train_examples(np.arange(100, 140))
  b = ShapesDataset(0, 32, 10).train_examples(np.arange(100, 140))
  for key in ('image', 'caption', 'label'):
    np.testing.assert_array_equal(a[key], b[key])
  # Example i does not depend on which other examples are generated with it.
  c = dataset.train_examples(np.array([139, 100, 117]))
  for key in ('image', 'caption', 'label'):
    np.testing.assert_array_equal(c[key], a[key][[39, 0, 17]])
  other = ShapesDataset(1, 32, 10).train_examples(np.arange(100, 140))
  assert not np.array_equal(other['image'], a['image'])
  assert list(other['caption']) != list(a['caption'])


def test_heldout_never_in_training(dataset):
  examples = dataset.train_examples(np.arange(20000))
  labels = examples['label']
  assert not np.isin(labels, dataset.heldout_classes).any()
  parsed = np.array([_parse(c) for c in examples['caption']])
  np.testing.assert_array_equal(parsed, labels)   # Captions describe their image's class ...
  assert not np.isin(parsed, dataset.heldout_classes).any()   # ... never a held-out one.
  # Every training class (hence every colour and every shape) occurs.
  np.testing.assert_array_equal(np.unique(labels), dataset.train_classes)


@pytest.mark.parametrize('image_size', [24, 32, 48, 64])
def test_images_carry_the_class_colour_inside_the_image(image_size):
  ds = ShapesDataset(0, image_size, 10)
  examples = ds.train_examples(np.arange(300))
  images, labels = examples['image'], examples['label']
  assert images.shape == (300, image_size, image_size, 3) and images.dtype == np.uint8
  assert examples['label'].dtype == np.int32 and examples['caption'].dtype == object
  pixels = images.astype(np.float32)
  distance = np.linalg.norm(
      pixels[:, :, :, None, :] - synthetic.COLOUR_RGB[None, None, None], axis=-1)  # [n,H,W,8]
  near = distance < 40
  own = near[np.arange(300), :, :, labels // synthetic.NUM_SHAPES]                  # [n,H,W]
  others = near.sum(-1) - own
  min_area = 0.035 * image_size**2   # Smaller than the smallest shape (triangle, ~0.05 S^2).
  assert (own.sum((1, 2)) >= min_area).all()
  assert (others.sum((1, 2)) == 0).all()   # Backgrounds are muted: no pixel looks like a colour.
  # Shapes lie fully inside the image: the border never carries the shape colour.
  border = own[:, [0, -1], :].any((1, 2)) | own[:, :, [0, -1]].any((1, 2))
  assert not border.any()


def test_caption_variety_and_canonical_words(dataset):
  examples = dataset.train_examples(np.arange(1000))
  captions = list(examples['caption'])
  assert len(set(captions)) >= 200
  colour = examples['label'] // synthetic.NUM_SHAPES
  canonical = [re.search(rf'\b{synthetic.COLOURS[c]}\b', s.lower()) is not None
               for c, s in zip(colour, captions)]
  assert 0.4 < np.mean(canonical) < 0.65
  assert dataset.captions(50, start=100) == list(
      dataset.train_examples(np.arange(100, 150))['caption'])


def test_eval_examples(dataset):
  heldout = dataset.eval_examples(per_class=4, split='heldout')
  assert heldout['image'].shape == (40, 32, 32, 3)
  np.testing.assert_array_equal(heldout['label'], np.repeat(dataset.heldout_classes, 4))
  assert [_parse(c) for c in heldout['caption']] == list(heldout['label'])
  seen = dataset.eval_examples(per_class=2, split='seen')
  np.testing.assert_array_equal(np.unique(seen['label']), dataset.train_classes)
  # Deterministic, and the first examples of a class do not depend on per_class.
  again = dataset.eval_examples(per_class=3, split='heldout')
  np.testing.assert_array_equal(again['image'].reshape(10, 3, -1)[:, :3],
                                heldout['image'].reshape(10, 4, -1)[:, :3])
  # Drawn from a stream disjoint from training.
  train = dataset.train_examples(np.arange(2000))['image'].reshape(2000, -1)
  train_bytes = {row.tobytes() for row in train}
  seen_rows = seen['image'].reshape(len(seen['image']), -1)
  assert not any(row.tobytes() in train_bytes for row in seen_rows)
  with pytest.raises(ValueError, match='split'):
    dataset.eval_examples(2, 'test')


def test_zeroshot_templates():
  assert len(synthetic.ZEROSHOT_TEMPLATES) >= 4
  assert all(t.count('{}') == 1 for t in synthetic.ZEROSHOT_TEMPLATES)
