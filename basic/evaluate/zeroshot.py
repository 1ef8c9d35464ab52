"""Zero-shot classification: class names x prompt templates -> text classifier.

Per class, the template embeddings are averaged and re-normalised (CLIP's prompt ensembling);
images are classified by cosine similarity against all classes.

The evaluator 'zeroshot' (basic.evaluate.EVALUATORS): `evaluate` scores a TFDS data set named by
a config task (config.eval.tasks.NAME, kind='zeroshot'; fields in DEFAULTS and
basic/evaluate/tasks.py), with its class names, templates and an optional class subset
(ImageNet-A / -R), on the devices of a mesh. basic/evaluate/synthetic.py scores in-memory data.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from basic.evaluate import datasets
from basic.evaluate import metadata
from basic.evaluate import ranking


def class_embeddings(encoders, params, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """-> float32 [num_classes, d] unit vectors (basic.evaluate.ranking.class_embeddings) with the
  text tower of `encoders` on the mesh."""
  return ranking.class_embeddings(
      lambda prompts: encoders.same_texts(params, tokenizer.encode(prompts)), class_names,
      templates)


# --- Zero-shot classification of a TFDS data set (config.eval.tasks, kind='zeroshot'). ----------
#
# Top-k under basic.evaluate.ranking's rule (ties to the lower class index); with a `subset`, only
# its classes are allowed.


def make_score_fn(encoders, ks: Sequence[int]):
  """-> jitted score(params, images [B, S, S, 3], labels [B], valid [B], distinct_emb [C', d],
  class_index [C], allowed [C]) -> {'top{k}': int32 hits, 'count': int32 valid rows} over the
  global batch (replicated).

  Class c's embedding is distinct_emb[class_index[c]]: classes with identical embeddings (the
  same name) share one column of the image x class product, so their logits tie exactly.
  """
  model = encoders.model

  def score(params, images, labels, valid, distinct_emb, class_index, allowed):
    emb = model.apply({'params': params}, images, method='encode_image').astype(jnp.float32)
    logits = (emb @ distinct_emb.T)[:, class_index]                               # [B, C]
    hits = ranking.topk_hits(logits, labels, allowed, ks)
    out = {f'top{k}': jnp.sum(hit & valid, dtype=jnp.int32) for k, hit in hits.items()}
    out['count'] = jnp.sum(valid, dtype=jnp.int32)
    return out
  return encoders.jit(score)


def tfds_class_names(label_feature) -> tuple[str, ...]:
  """A ClassLabel's names as prompts read them: underscores as spaces."""
  return tuple(name.replace('_', ' ') for name in label_feature.names)


def evaluate_task(task_name: str, task, encoders, params, tokenizer, config,
                  score_fn=None) -> dict[str, float]:
  """Zero-shot top-k accuracy of a TFDS task (see basic/evaluate/tasks.py for its fields).

  The class embeddings (per class, the template embeddings averaged and re-normalised) are
  computed once, then kept on the devices replicated over the mesh while every image batch is
  scored there; only the hit counts come back.

  Args:
    task_name: the task's name in config.eval.tasks (metric prefix).
    task: its ConfigDict.
    encoders: `basic.evaluate.encoders.Encoders` of the model, batch size task.batch_size.
    params: the model parameters.
    tokenizer: `basic.tokenizer.Tokenizer`.
    config: the experiment config (data.image_size, resize_method, antialias, threads).
    score_fn: `make_score_fn(encoders, task.ks)` (pass one to reuse its compilation).

  Returns:
    {'NAME/top{k}': accuracy for k in task.ks, 'NAME/num_images': images scored (all hosts),
    'NAME/num_classes': classes allowed}.
  """
  field = lambda name: datasets.field_name(task_name, name)
  builder = datasets.builder(task, task_name)
  datasets.check_image(builder, task, task_name)
  label_feature = datasets.class_label(builder, task, task_name)
  if task.class_names:
    names = metadata.class_names(task.class_names, field('class_names'))
  else:
    names = tfds_class_names(label_feature)
  if len(names) != label_feature.num_classes:
    raise ValueError(f'{field("class_names")}={task.class_names!r}: {len(names)} names, but '
                     f'{field("label_key")}={task.label_key!r} of TFDS {builder.info.full_name} '
                     f'has {label_feature.num_classes} classes.')
  templates = metadata.templates(task.templates, field('templates'))
  subset = metadata.subset(task.subset, len(names), field('subset'))
  allowed = ranking.allowed_classes(len(names), subset)

  emb = class_embeddings(encoders, params, tokenizer, names, templates)
  distinct, class_index = np.unique(emb, axis=0, return_inverse=True)
  class_emb = (encoders.replicate(distinct), encoders.replicate(class_index.reshape(-1)))
  allowed_device = encoders.replicate(allowed)

  split, counts = datasets.host_split(builder, task, task_name, jax.process_index(),
                                      jax.process_count())
  ds = datasets.examples(builder, split, task.image_key, config.data.image_size,
                         extra={'label': task.label_key},
                         resize_method=config.data.resize_method,
                         antialias=config.data.antialias, threads=config.data.threads)
  local = encoders.local_batch
  batches = ds.batch(local).prefetch(2).as_numpy_iterator()
  score_fn = score_fn or make_score_fn(encoders, tuple(task.ks))
  size = config.data.image_size
  hits = {k: 0 for k in task.ks}
  num_images = 0
  for _ in range(-(-max(counts) // local)):    # The same number of steps on every host.
    batch = next(batches, None)
    if batch is None:
      batch = {'image': np.zeros((0, size, size, 3), np.uint8), 'label': np.zeros(0, np.int64)}
    n = len(batch['label'])
    valid = np.arange(local) < n
    labels = np.asarray(batch['label'], np.int32)
    out = score_fn(params, encoders.put(batch['image']), encoders.put(labels),
                   encoders.put(valid), *class_emb, allowed_device)
    for k in task.ks:
      hits[k] += int(out[f'top{k}'])
    num_images += int(out['count'])
  results = {f'{task_name}/top{k}': hits[k] / max(num_images, 1) for k in task.ks}
  results[f'{task_name}/num_images'] = float(num_images)
  results[f'{task_name}/num_classes'] = float(allowed.sum())
  return results


# --- The evaluator 'zeroshot' (basic.evaluate.EVALUATORS). ----------------------------------------

DEFAULTS = dict(tfds_name='imagenet2012', split='validation', data_dir='', image_key='image',
                label_key='label', class_names='imagenet1k', templates='clip80', subset='',
                max_examples=0, ks=(1, 5))


def validate(task, field: str, config):
  """Config-only checks of a zero-shot task; ConfigError naming config.<field>.<x>."""
  del task
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  from basic import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  evaluate_lib.check_tfds_fields(
      config, field, ('tfds_name', 'split', 'image_key', 'label_key', 'templates'),
      ('data_dir', 'class_names', 'subset'))
  known = {'class_names': metadata.CLASS_NAMES, 'templates': metadata.TEMPLATES,
           'subset': metadata.SUBSETS}
  for name, choices in known.items():
    value = config_lib.get_field(config, f'{field}.{name}')
    if value and value not in choices and not metadata.is_path(value):
      config_lib.fail(f'{field}.{name}', value, f'must be one of {sorted(choices)} or a path to '
                      'a text file (one entry per line).')
  evaluate_lib.check_ks(config, f'{field}.ks')


def evaluate(name: str, task, encoders, params, tokenizer, config, *, state: dict):
  """`evaluate_task` with its scorer compiled once per batch size and ks (encoders.compiled)."""
  del state
  key = ('zeroshot.score', tuple(task.ks))
  if key not in encoders.compiled:
    encoders.compiled[key] = make_score_fn(encoders, tuple(task.ks))
  return evaluate_task(name, task, encoders, params, tokenizer, config,
                       score_fn=encoders.compiled[key])
