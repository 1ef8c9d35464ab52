"""Small image-text data sets written by the tests (no download): TFRecord shards in img2dataset's
schema and two local TFDS data sets, all with real JPEG / PNG bytes.

Example i shows synthetic shape i (basic/data/synthetic.py) and has the caption `caption(i)`,
'photo {i} {class name}', so the tests can tell examples apart from their tokens.
"""
import os

import numpy as np

from basic import tokenizer as tokenizer_lib
from basic.data import pipeline
from basic.data import synthetic
from basic.data import tf_setup
from basic.data import write_tfrecords

tf = tf_setup.configure_tensorflow()   # Before any TF op, as the training program does.
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,g-bad-import-order

NUM_EXAMPLES = 24          # of each TFDS data set.
IMAGE_SIZE = 40            # px of the stored images (the pipeline crops and resizes to 32).
NUM_CAPTIONS = 3           # captions per example of the multi-caption TFDS data set.

tfds.disable_progress_bar()


def images_and_names(n: int, size: int = IMAGE_SIZE):
  """uint8 [n, size, size, 3] images and the n class names of synthetic training examples."""
  data = synthetic.ShapesDataset(seed=1, image_size=size, num_heldout=0)
  examples = data.train_examples(np.arange(n))
  return examples['image'], [data.class_names[c] for c in examples['label']]


def caption(i: int, names) -> str:
  return f'photo {i} {names[i]}'


def jpeg(image) -> bytes:
  return tf.io.encode_jpeg(image, quality=95).numpy()


def png(image) -> bytes:
  return tf.io.encode_png(image).numpy()


# Kinds of bad records `write_shards` can write; every one must be dropped by the pipeline.
BAD_KINDS = ('garbage_image', 'truncated_jpeg', 'empty_caption', 'blank_caption', 'no_caption',
             'int_caption', 'float_image', 'no_image', 'empty_image')


def _record(i, image, text, kind=None) -> bytes:
  """One img2dataset-style record; `kind` makes it bad in one of the BAD_KINDS ways."""
  example = write_tfrecords.make_example(f'{i:09d}', jpeg(image), text, image.shape[1],
                                         image.shape[0])
  feature = example.features.feature
  if kind == 'garbage_image':
    feature['jpg'].bytes_list.value[0] = b'\xff\xd8\xff' + bytes(range(256)) * 4
  elif kind == 'truncated_jpeg':
    feature['jpg'].bytes_list.value[0] = feature['jpg'].bytes_list.value[0][:-200]
  elif kind == 'empty_image':
    feature['jpg'].bytes_list.value[0] = b''
  elif kind == 'empty_caption':
    feature['txt'].bytes_list.value[0] = b''
  elif kind == 'blank_caption':
    feature['txt'].bytes_list.value[0] = b' \t '
  elif kind == 'no_caption':
    del feature['txt']
  elif kind == 'int_caption':
    feature['txt'].ClearField('bytes_list')
    feature['txt'].int64_list.value.append(7)
  elif kind == 'float_image':
    feature['jpg'].ClearField('bytes_list')
    feature['jpg'].float_list.value.append(1.0)
  elif kind == 'no_image':
    del feature['jpg']
  elif kind is not None:
    raise ValueError(kind)
  return example.SerializeToString()


def write_shards(directory: str, n: int, num_shards: int, bad=None, png_every: int = 0):
  """Writes n records as num_shards img2dataset-style shards '{directory}/0000k.tfrecord'.

  Args:
    directory: output folder.
    n: number of records (record i: image i, caption `caption(i)`, key f'{i:09d}').
    num_shards: records are split into this many contiguous shards.
    bad: {record index: kind in BAD_KINDS}.
    png_every: if > 0, every png_every-th good record holds PNG bytes (still under 'jpg').

  Returns:
    (list of shard paths, list of the n captions).
  """
  bad = bad or {}
  images, names = images_and_names(n)
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, f'{s:05d}.tfrecord') for s in range(num_shards)]
  captions = [caption(i, names) for i in range(n)]
  bounds = np.linspace(0, n, num_shards + 1).astype(int)
  for s, path in enumerate(paths):
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(bounds[s], bounds[s + 1]):
        record = _record(i, images[i], captions[i], bad.get(i))
        if png_every and i % png_every == 0 and i not in bad:
          example = tf.train.Example.FromString(record)
          example.features.feature['jpg'].bytes_list.value[0] = png(images[i])
          record = example.SerializeToString()
        writer.write(record)
  return paths, captions


class BasicTestCaptions(tfds.core.GeneratorBasedBuilder):
  """NUM_EXAMPLES JPEG images, one caption each ('caption'), and their index ('id')."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'caption': tfds.features.Text(),
        'id': np.int64,
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    images, names = images_and_names(NUM_EXAMPLES)
    for i in range(NUM_EXAMPLES):
      yield i, {'image': images[i], 'caption': caption(i, names), 'id': i}


class BasicTestMultiCaptions(tfds.core.GeneratorBasedBuilder):
  """NUM_EXAMPLES PNG images with NUM_CAPTIONS captions each, COCO-style ('captions/text')."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
        'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
        'id': np.int64,
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    images, names = images_and_names(NUM_EXAMPLES)
    for i in range(NUM_EXAMPLES):
      texts = [multi_caption(i, k, names) for k in range(NUM_CAPTIONS)]
      yield i, {'image': images[i], 'captions': {'text': texts}, 'id': i}


def multi_caption(i: int, k: int, names) -> str:
  return f'photo {i} take {k} {names[i]}'


def prepare(builder_cls, data_dir: str):
  """Generates a test TFDS data set into data_dir (nothing is downloaded); returns its name."""
  builder = builder_cls(data_dir=data_dir)
  builder.download_and_prepare()
  return builder.name


def train_tokenizer(config, path: str, vocab_size: int = 128) -> str:
  """A SentencePiece model trained on the captions of config's source (pipeline.caption_stream)."""
  return tokenizer_lib.train(pipeline.caption_stream(config, 10_000), vocab_size, path)
