"""Shared by the evaluation tests: a labelled local TFDS data set and one short training run.

`BasicTestLabels` holds NUM_LABELLED synthetic shapes (basic/data/synthetic.py, evaluation
stream) as non-square PNG images with a ClassLabel over the 48 colour x shape names, written with
underscores ('red_circle') as TFDS label names usually are. `trained_run` trains the tiny config
for a few steps once per test session (all evaluation tests and the notebook share it).
"""
import os

import numpy as np

from basic import train
from basic.data import synthetic
from basic.data import tf_setup
from tests.test_train import small_config

tf = tf_setup.configure_tensorflow()   # Before any TF op, as the programs do.
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,g-bad-import-order

tfds.disable_progress_bar()

PER_CLASS = 2                    # images per class of the labelled data set
CLASSES = (0, 7, 14, 21, 28, 35, 42, 47, 3, 10, 20, 30)   # 12 of the 48 classes
NUM_LABELLED = PER_CLASS * len(CLASSES)
IMAGE_HW = (40, 48)              # stored size (the evaluators resize + centre-crop to 32)
TRAIN_STEPS = 8

_RUN = {}


def labelled_examples():
  """-> (uint8 [n, 40, 48, 3] images, int64 [n] labels in 0..47, the 48 class names)."""
  data = synthetic.ShapesDataset(seed=3, image_size=IMAGE_HW[1], num_heldout=0)
  examples = data.eval_examples(PER_CLASS, 'seen')
  keep = np.isin(examples['label'], CLASSES)
  images = examples['image'][keep][:, 4:4 + IMAGE_HW[0]]      # crop rows: non-square
  return images, examples['label'][keep].astype(np.int64), list(data.class_names)


class BasicTestLabels(tfds.core.GeneratorBasedBuilder):
  """NUM_LABELLED PNG images 40 x 48 with a 48-way ClassLabel 'label' and an 'id'."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    names = [n.replace(' ', '_') for n in synthetic.ShapesDataset(0, 32, 0).class_names]
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
        'label': tfds.features.ClassLabel(names=names),
        'id': np.int64,
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'test': self._generate_examples()}

  def _generate_examples(self):
    images, labels, _ = labelled_examples()
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label), 'id': i}


def prepare(builder_cls, data_dir: str) -> str:
  """Generates a test TFDS data set into data_dir (nothing is downloaded); returns its name."""
  builder = builder_cls(data_dir=data_dir)
  builder.download_and_prepare()
  return builder.name


def trained_run(tmp_path_factory):
  """-> (config, workdir) of a tiny run of TRAIN_STEPS steps, trained once per session."""
  if 'run' not in _RUN:
    workdir = str(tmp_path_factory.mktemp('eval_run') / 'run')
    config = small_config(total_steps=TRAIN_STEPS, eval_every_steps=TRAIN_STEPS,
                          checkpoint_every_steps=TRAIN_STEPS,
                          **{'data.synthetic.eval_per_class': 10})
    config.optimizer.warmup_steps = 2
    train.train_and_evaluate(config, workdir)
    _RUN['run'] = (config, workdir)
  return _RUN['run']


def eval_reference_images(images: np.ndarray, size: int) -> np.ndarray:
  """The evaluators' preprocessing (preprocess.eval_image) of uint8 [n, h, w, 3] -> [n, S, S, 3]."""
  from basic.data import preprocess  # pylint: disable=g-import-not-at-top
  return np.stack([preprocess.eval_image(tf.constant(x), size).numpy() for x in images])


def workdir_checkpoint(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints', str(TRAIN_STEPS))
