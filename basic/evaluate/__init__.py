"""Evaluation of dual encoders: the evaluator registry and the evaluators a config lists.

`config.eval.tasks.NAME` is a task: a ConfigDict whose `kind` names an evaluator registered in
EVALUATORS, plus that evaluator's fields (its DEFAULTS; `tasks.task(kind, **overrides)` fills
them) and `batch_size` (images and texts per evaluation batch, global over hosts; 0 = the
config's microbatch_size). Its metrics are logged as 'NAME/...'. `config.eval.zeroshot = True`
adds the task {'kind': 'synthetic'} named 'zeroshot' (the synthetic data set's held-out
classes). An evaluator is one module (or object) registered here by one line:

  EVALUATORS.register('mine', 'my_package.my_evaluator')   # then kind='mine'

It exports:
  DEFAULTS                       {field: default} of its task fields (besides kind, batch_size).
  validate(task, field, config)  config-only checks of the task (field = 'eval.tasks.NAME');
                                 raises config_lib.ConfigError naming 'config.<field>.<x>'.
  evaluate(name, task, encoders, params, tokenizer, config, *, state) -> {'NAME/metric': float}
                                 the same on every host; `encoders` (encoders.Encoders) runs the
                                 towers over the mesh for global batches of task's batch size and
                                 keeps jitted functions in `encoders.compiled`; `state` is a dict
                                 kept for this task across evaluations (data, caches).
  prepare(name, task, config, state)   [optional] called once before training: load what the
                                 task needs, fail early (errors name the field).

  run.py        Evaluator / run_evaluators: the tasks of a config; evaluate_checkpoint.
  __main__.py   python -m basic.evaluate --workdir=DIR | --checkpoint=PATH [--config=FILE].
  tasks.py      task configs (task, zeroshot_task, retrieval_task, imagenet_suite).
  zeroshot.py   evaluator 'zeroshot': top-k with prompt ensembles on a TFDS data set.
  retrieval.py  evaluator 'retrieval': image <-> text recall@k, several captions per image.
  synthetic.py  evaluator 'synthetic': zero-shot on the synthetic data set's held-out classes.
  ranking.py    the top-k rule and prompt-ensembled class embeddings.
  datasets.py   evaluation examples from prepared TFDS data sets (tf.data, CPU).
  encoders.py   the towers jitted over the device mesh for global evaluation batches.
  metadata.py   class names, prompt templates, class subsets (data/: ImageNet-1k, CLIP's 80
                templates, CIFAR-10/100, ImageNet-A/R subsets).
"""
import re

from basic import registry

EVALUATORS = registry.Registry('evaluator', 'config.eval.tasks.<name>.kind')
EVALUATORS.register('zeroshot', 'basic.evaluate.zeroshot')
EVALUATORS.register('retrieval', 'basic.evaluate.retrieval')
EVALUATORS.register('synthetic', 'basic.evaluate.synthetic')

SYNTHETIC_TASK = 'zeroshot'   # The name (metric prefix) of config.eval.zeroshot's task.


def config_tasks(config) -> dict:
  """{name: task} of the config: config.eval.zeroshot's, then config.eval.tasks in order."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = {}
  if config.eval.zeroshot:
    out[SYNTHETIC_TASK] = ml_collections.ConfigDict({'kind': 'synthetic', 'batch_size': 0})
  out.update(config.eval.tasks.items())
  return out


def batch_size(task, config) -> int:
  """The task's global evaluation batch: task.batch_size, 0 = config.microbatch_size."""
  return task.batch_size or config.microbatch_size


def validate(config, *, num_processes: int = 1, num_data_devices: int = 1):
  """config.eval: zeroshot (bool) and the tasks: names, kinds, batch sizes, then each
  evaluator's own `validate`. Data sets, splits and features are checked when a task runs."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_bool(config, 'eval.zeroshot')
  tasks = config_lib.get_field(config, 'eval.tasks')
  if not isinstance(tasks, ml_collections.ConfigDict):
    config_lib.fail('eval.tasks', tasks, 'must be a ConfigDict of named tasks.')
  for name, task in tasks.items():
    field = f'eval.tasks.{name}'
    if not re.fullmatch(r'[A-Za-z][A-Za-z0-9_-]*', name) or name == SYNTHETIC_TASK:
      config_lib.fail(field, name, 'task names must match [A-Za-z][A-Za-z0-9_-]* and differ '
                      f"from {SYNTHETIC_TASK!r} (the synthetic evaluation's metric prefix).")
    if not isinstance(task, ml_collections.ConfigDict):
      config_lib.fail(field, task, 'must be a ConfigDict (basic.evaluate.tasks.task(kind, ...)).')
    kind = config_lib.check_choice(config, f'{field}.kind', sorted(EVALUATORS.names()))
    batch = config_lib.check_int(config, f'{field}.batch_size', 0) or config.microbatch_size
    if batch % num_processes or batch % num_data_devices:
      config_lib.fail(f'{field}.batch_size', task.batch_size,
                      f'the evaluation batch ({batch}; 0 = config.microbatch_size) must be '
                      f'divisible by the number of processes ({num_processes}) and of '
                      f'data-parallel devices ({num_data_devices}).')
    entry = EVALUATORS.get(kind)
    if hasattr(entry, 'validate'):
      entry.validate(task, field, config)


def check_ks(config, field: str):
  """A non-empty tuple of integers >= 1 (top-k or recall@k values)."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  ks = config_lib.get_field(config, field)
  if (not isinstance(ks, (tuple, list)) or not ks or
      any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks)):
    config_lib.fail(field, ks, 'must be a non-empty tuple of integers >= 1.')
  return ks


def check_tfds_fields(config, field: str, text: tuple, optional: tuple = ()):
  """String fields of a TFDS task: `text` non-empty, `optional` may be ''; max_examples needs an
  unsliced split."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  for name in text + optional:
    value = config_lib.check_str(config, f'{field}.{name}')
    if name in text and not value:
      config_lib.fail(f'{field}.{name}', value, 'must not be empty.')
  task = config_lib.get_field(config, field)
  if config_lib.check_int(config, f'{field}.max_examples', 0) and '[' in task.split:
    config_lib.fail(f'{field}.max_examples', task.max_examples,
                    f'cannot be combined with a sliced split (config.{field}.split='
                    f'{task.split!r}); set 0 or slice the split only.')
