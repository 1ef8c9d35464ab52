"""Evaluation task configs: `config.eval.tasks.NAME = task(kind, ...)`, `zeroshot_task(...)` or
`retrieval_task(...)`.

Each task is a ConfigDict of its own, filled from its evaluator's DEFAULTS (basic.evaluate
.EVALUATORS; the evaluator's module documents its fields); its results are logged as `NAME/top1`,
`NAME/top5` (zero-shot) or `NAME/i2t_recall@1`, `NAME/t2i_recall@5`, ... (retrieval). Fields of
the built-in evaluators:

  kind          the evaluator: 'zeroshot' | 'retrieval' | any registered one.
  tfds_name     a prepared TFDS data set: 'name', 'name/config' or 'name:version' (nothing is
                downloaded: `tfds build NAME --data_dir=DIR` first).
  split         its split ('validation', 'test', 'train[:1000]', ...).
  data_dir      TFDS data dir ('' = TFDS's default; may be gs://).
  image_key     the image feature.
  batch_size    images (and texts) per evaluation batch, global over hosts; 0 = the config's
                microbatch_size.
  max_examples  evaluate the first N examples of the split only (0 = all); needs an unsliced
                split.
  zeroshot only:
    label_key   an integer ClassLabel feature.
    class_names 'imagenet1k' | 'cifar10' | 'cifar100' | a text file | '' (the ClassLabel's names).
    templates   'clip80' | 'clip_cifar' | 'photo' | 'synthetic' | a text file
                (see basic/evaluate/metadata.py).
    subset      '' | 'imagenet_a' | 'imagenet_r' | a file of class indices: the logits of the other
                classes are masked (ImageNet-A/R label images with ImageNet-1k indices).
    ks          top-k accuracies to report, e.g. (1, 5).
  retrieval only:
    caption_key the caption feature: a text, or a sequence of texts (several captions per
                image). Nested TFDS features are named by their '/'-joined path, as in
                config.data.text_key: COCO-style {'captions': Sequence({'text': Text})} is
                'captions/text'.
    ks          recall@k to report in both directions, e.g. (1, 5, 10).

Feature keys may be '/'-joined paths into nested features for every *_key field.
"""
import ml_collections

def task(kind: str, **overrides) -> ml_collections.ConfigDict:
  """A task of evaluator `kind`: {'kind': kind, 'batch_size': 0, **its DEFAULTS, **overrides}."""
  from basic import evaluate  # pylint: disable=g-import-not-at-top
  fields = dict(kind=kind, batch_size=0, **getattr(evaluate.EVALUATORS.get(kind), 'DEFAULTS', {}))
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f'{unknown}: not fields of a {kind!r} task; its fields: {sorted(fields)}.')
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def zeroshot_task(**overrides) -> ml_collections.ConfigDict:
  """A zero-shot classification task (ImageNet-1k validation by default)."""
  return task('zeroshot', **overrides)


def retrieval_task(**overrides) -> ml_collections.ConfigDict:
  """An image-text retrieval task (COCO captions test split by default)."""
  return task('retrieval', **overrides)


def imagenet_suite(data_dir: str = '', batch_size: int = 0) -> ml_collections.ConfigDict:
  """ImageNet-1k and its distribution shifts with CLIP's 80 templates, plus CIFAR-10/100.

  The TFDS data sets must be prepared in `data_dir` (`tfds build imagenet2012 imagenet_v2
  imagenet_a imagenet_r imagenet_sketch cifar10 cifar100 --data_dir=...`; ImageNet needs its
  archives placed in the manual dir first).
  """
  common = dict(data_dir=data_dir, batch_size=batch_size)
  return ml_collections.ConfigDict(dict(
      imagenet=zeroshot_task(**common),
      imagenet_v2=zeroshot_task(tfds_name='imagenet_v2', split='test', **common),
      imagenet_a=zeroshot_task(tfds_name='imagenet_a', split='test', subset='imagenet_a',
                               **common),
      imagenet_r=zeroshot_task(tfds_name='imagenet_r', split='test', subset='imagenet_r',
                               **common),
      imagenet_sketch=zeroshot_task(tfds_name='imagenet_sketch', split='test', **common),
      cifar10=zeroshot_task(tfds_name='cifar10', split='test', class_names='cifar10',
                            templates='clip_cifar', **common),
      cifar100=zeroshot_task(tfds_name='cifar100', split='test', class_names='cifar100',
                             templates='clip_cifar', **common),
  ))
