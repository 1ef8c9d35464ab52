"""Runs the evaluation tasks a config lists, each by its evaluator (basic.evaluate.EVALUATORS).

  results = run_evaluators(config, model, params, tokenizer, step=step)
  # {'zeroshot/top1': ..., 'imagenet/top1': ..., 'coco/i2t_recall@1': ..., ...}

`config.eval.zeroshot` (bool) runs the held-out zero-shot evaluation of the synthetic data set
(evaluator 'synthetic', metrics 'zeroshot/*'); every entry NAME of `config.eval.tasks` runs the
evaluator its `kind` names (metrics 'NAME/*'). During training, keep one `Evaluator` so that its
jitted functions compile once.
"""
import sys
import time
from typing import Optional

from absl import logging
import jax

from basic import config_lib
from basic import inference
from basic import metric_writers
from basic import models
from basic import sharding
from basic import tokenizer as tokenizer_lib
from basic import evaluate as evaluate_lib
from basic.data import tf_setup
from basic.evaluate import encoders as encoders_lib

# create_writer(start_step=S) drops rows of steps > S from an existing metrics.jsonl (resume);
# evaluation keeps every row.
_KEEP_ALL_ROWS = sys.maxsize


class Evaluator:
  """The evaluators of a config for one model; call it with the current parameters.

  Args:
    config: the experiment config (eval.zeroshot, eval.tasks, data.*, microbatch_size).
    model: the `DualEncoder`.
    mesh: the device mesh the parameters live on (default: `sharding.make_mesh(config.mesh)`).
      Evaluation batches are sharded over its 'data' axis; class embeddings are replicated.
  """

  def __init__(self, config, model, mesh=None):
    self.config, self.model = config, model
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self._tasks = evaluate_lib.config_tasks(config)
    self._states = {name: {} for name in self._tasks}   # Each task's data and caches.
    self._encoders = {}       # batch size -> Encoders
    for name, task in self._tasks.items():   # Up front: a task that cannot run fails now.
      entry = evaluate_lib.EVALUATORS.get(task.kind)
      if hasattr(entry, 'prepare'):
        entry.prepare(name, task, config, self._states[name])

  def encoders(self, batch_size: int) -> encoders_lib.Encoders:
    if batch_size not in self._encoders:
      self._encoders[batch_size] = encoders_lib.Encoders(self.model, self.mesh, batch_size)
    return self._encoders[batch_size]

  def place(self, params):
    """`params` on the mesh: as they are if already there (training), else sharded by
    config.sharding (e.g. parameters restored on one device)."""
    devices = set(self.mesh.devices.flat)
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and set(x.sharding.device_set) == devices for x in leaves):
      return params
    return sharding.put_whole(
        params, sharding.param_shardings(params, self.mesh, self.config.get('sharding')))

  def __call__(self, params, tokenizer, *, step: Optional[int] = None,
               suffix: str = '') -> dict[str, float]:
    """-> {metric name: value} of every task of the config (same on every host).

    `suffix` follows each task's name in its metrics: suffix='_ema' gives 'zeroshot_ema/top1'
    for 'zeroshot/top1' (the EMA of the parameters, config.ema_decay)."""
    results = {}
    params = self.place(params)
    for name, task in self._tasks.items():
      start = time.perf_counter()
      entry = evaluate_lib.EVALUATORS.get(task.kind)
      out = entry.evaluate(name, task, self.encoders(evaluate_lib.batch_size(task, self.config)),
                           params, tokenizer, self.config, state=self._states[name])
      out = {with_suffix(k, suffix): v for k, v in out.items()}
      _log(name + suffix, step, out, time.perf_counter() - start)
      results.update(out)
    return results


def with_suffix(metric: str, suffix: str) -> str:
  """'task/name' -> 'task{suffix}/name' (a metric without '/': 'metric{suffix}')."""
  task, sep, rest = metric.partition('/')
  return f'{task}{suffix}{sep}{rest}'


def _log(name: str, step: Optional[int], results: dict, seconds: float):
  if jax.process_index() == 0:
    where = f' at step {step}' if step is not None else ''
    values = ' '.join(f'{k.split("/", 1)[1]}={v:.4g}' for k, v in sorted(results.items()))
    logging.info('Evaluation %s%s (%.1f s): %s', name, where, seconds, values)


def run_evaluators(config, model, params, tokenizer, *, step: Optional[int] = None,
                   mesh=None, suffix: str = '') -> dict[str, float]:
  """Runs every task of the config once (the synthetic zero-shot if config.eval.zeroshot, and
  config.eval.tasks); -> {metric name: value}, `suffix` after each task's name (see
  `Evaluator`). See `Evaluator` to evaluate repeatedly."""
  return Evaluator(config, model, mesh)(params, tokenizer, step=step, suffix=suffix)


def evaluate_checkpoint(checkpoint: str, *, config=None, workdir: Optional[str] = None,
                        step: Optional[int] = None, tensorboard_dir: Optional[str] = None,
                        use_ema: bool = False) -> tuple[int, dict]:
  """Evaluates one checkpoint step (`python -m basic.evaluate`); -> (step, {metric: value}).

  Args:
    checkpoint: a run's workdir, checkpoints directory or step directory (local or gs://).
    config: the experiment config listing the evaluators (default: the checkpoint's own); its
      model must match the checkpoint's. The tokenizer is always the checkpoint's.
    workdir: if given, the results are appended to its metrics.jsonl (existing rows kept) and
      TensorBoard events at the checkpoint's step (process 0 writes).
    step: the step (default: the latest, or the step directory's).
    tensorboard_dir: TensorBoard event files (default: workdir).
    use_ema: evaluate the checkpoint's EMA of the parameters (config.ema_decay > 0) instead;
      its metrics are named as during training, 'zeroshot_ema/top1'.
  """
  tf_setup.configure_tensorflow()
  loaded = inference.load(checkpoint, step=step, use_ema=use_ema)
  config = config if config is not None else loaded.config
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate(config, num_processes=jax.process_count(),
                      num_data_devices=mesh.shape[sharding.DATA_AXIS])
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, loaded.tokenizer.model_path,
                                           config.data.text_length)
  results = run_evaluators(config, models.build(config), loaded.params, tokenizer,
                           step=loaded.step, mesh=mesh, suffix='_ema' if use_ema else '')
  if workdir is not None and results:
    writer = metric_writers.create_writer(workdir, start_step=_KEEP_ALL_ROWS,
                                          tensorboard_dir=tensorboard_dir)
    writer.write_scalars(loaded.step, results)
    writer.flush()
    writer.close()
  return loaded.step, results
