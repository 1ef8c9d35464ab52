"""The evaluator 'synthetic': zero-shot classification of the synthetic data set's held-out
colour x shape combinations among all 48 (basic/data/synthetic.py), the task that
`config.eval.zeroshot = True` adds under the name 'zeroshot' (metrics 'zeroshot/top1', ...).

The images (config.data.synthetic.eval_per_class per held-out class) are made once, before
training (`prepare`), so a config whose data source has no held-out split fails there.
"""
from basic.data import pipeline
from basic.evaluate import ranking
from basic.evaluate import zeroshot

DEFAULTS = {}


def evaluate_data(encoders, params, tokenizer, data: dict, prefix: str = 'zeroshot') -> dict:
  """Zero-shot top-1/top-5 on in-memory `data` (images, labels, class_names, templates), the
  same on every host; each host encodes its share of every global batch on the mesh of
  `encoders` (`basic.evaluate.encoders.Encoders`). -> {'PREFIX/top1', 'PREFIX/top5',
  'PREFIX/num_classes', 'PREFIX/num_images'}."""
  classes = zeroshot.class_embeddings(encoders, params, tokenizer, data['class_names'],
                                      data['templates'])
  images = encoders.same_images(params, data['images'])
  acc = ranking.topk_accuracy(images @ classes.T, data['labels'], ks=(1, 5))
  return {f'{prefix}/top1': acc[1], f'{prefix}/top5': acc[5],
          f'{prefix}/num_classes': float(len(data['class_names'])),
          f'{prefix}/num_images': float(len(data['labels']))}


def prepare(name: str, task, config, state: dict):
  del name, task
  state['data'] = pipeline.make_zeroshot_data(config)


def evaluate(name: str, task, encoders, params, tokenizer, config, *, state: dict):
  if 'data' not in state:
    prepare(name, task, config, state)
  return evaluate_data(encoders, params, tokenizer, state['data'], prefix=name)
