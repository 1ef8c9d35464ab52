"""A toy evaluator for tests/test_extensions.py: one file, registered by one line
(`basic.evaluate.EVALUATORS.register('toy_alignment', 'toy_evaluator')`).

The mean cosine similarity of matching (image, caption) pairs of the toy colour data
(tests/toy_source.py), and the fraction of images whose own caption is the most similar of the
K colour captions: metrics 'NAME/alignment' and 'NAME/top1'.
"""
import numpy as np

import toy_source

DEFAULTS = {'num_examples': 16}


def validate(task, field, config):
  del task
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_int(config, f'{field}.num_examples', 1)


def prepare(name, task, config, state):
  del name
  state['images'], state['captions'] = toy_source.examples(config, np.arange(task.num_examples))


def evaluate(name, task, encoders, params, tokenizer, config, *, state):
  del task
  k = config.data.toy_colours.num_colours
  image_emb = encoders.same_images(params, state['images'])
  text_emb = encoders.same_texts(params, tokenizer.encode(state['captions']))
  class_emb = encoders.same_texts(params, tokenizer.encode(
      list(toy_source.examples(config, np.arange(k))[1])))
  labels = np.arange(len(image_emb)) % k
  return {f'{name}/alignment': float(np.mean(np.sum(image_emb * text_emb, axis=1))),
          f'{name}/top1': float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))}
