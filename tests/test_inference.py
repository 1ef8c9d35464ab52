"""basic.inference: a checkpoint alone gives embeddings and zero-shot probabilities."""
import os

import numpy as np
import pytest

from basic import inference
from basic import metric_writers
from basic import train
from basic.data import pipeline
from tests.test_train import small_config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('inference') / 'run')
  config = small_config(total_steps=8, eval_every_steps=8, checkpoint_every_steps=8,
                        **{'data.synthetic.eval_per_class': 10})
  config.optimizer.warmup_steps = 2
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_load_classifies_heldout_like_training_reported(run):
  config, workdir = run
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  reported = [r for r in rows if 'zeroshot/top1' in r][-1]
  model = inference.load(workdir, batch_size=config.microbatch_size)
  assert model.step == 8
  data = pipeline.make_zeroshot_data(config)
  probs = model.zero_shot(list(data['images']), data['class_names'])
  assert probs.shape == (len(data['labels']), 48)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  top1 = float(np.mean(probs.argmax(axis=1) == data['labels']))
  ranked = np.argsort(-probs, axis=1)[:, :5]
  top5 = float(np.mean(np.any(ranked == data['labels'][:, None], axis=1)))
  assert top1 == reported['zeroshot/top1'] and top5 == reported['zeroshot/top5']
  # The comparison means something: after 8 steps the model is not constant (several classes
  # predicted, probabilities far from uniform), so a wrong load would not match by accident.
  # (Accuracy after 8 steps depends on the initial draw: top-5 was 0.08 to 0.22 across inits.)
  assert len(set(probs.argmax(axis=1).tolist())) >= 3
  assert float(np.ptp(probs, axis=1).mean()) > 1e-3


def test_images_of_any_size_and_type_are_preprocessed(run):
  config, workdir = run
  model = inference.load(os.path.join(workdir, 'checkpoints', '8'))
  data = pipeline.make_zeroshot_data(config)
  image = data['images'][0]                                   # uint8 32 x 32
  big = np.kron(image, np.ones((3, 3, 1), np.uint8))          # 96 x 96, same picture
  padded = np.pad(big, ((0, 0), (12, 12), (0, 0)))            # 96 x 120: centre crop = big
  as_float = image.astype(np.float32) / 255.0
  emb = model.encode_images([image, big, padded, as_float])
  assert emb.shape == (4, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(emb[3], emb[0], atol=1e-6)        # float in [0, 1] == uint8.
  assert float(emb[1] @ emb[0]) > 0.9                         # a 3x upscale looks the same.
  # Centre crop of the padded image: big again, up to the resize filter's reach into the
  # padding at the crop border.
  assert float(emb[2] @ emb[1]) > 0.99
  texts = model.encode_texts(['a red circle', 'a red circle', 'a blue square'])
  np.testing.assert_allclose(texts[0], texts[1], atol=1e-6)
  assert float(texts[0] @ texts[2]) < 0.9999
