r"""Evaluates a checkpoint: `python -m basic.evaluate --workdir=DIR [--config=FILE]`.

  python -m basic.evaluate --workdir=runs/tiny                      # latest checkpoint of a run
  python -m basic.evaluate --checkpoint=gs://b/runs/l/checkpoints/80000 --config=configs/x.py
  python -m basic.evaluate --workdir=runs/tiny --step=500 --config=configs/tiny.py \
      --config.eval.zeroshot=False

Runs the evaluators the config lists (config.eval.zeroshot and config.eval.tasks, see
basic/evaluate/run.py) on the parameters of one checkpoint step and prints the results as one
JSON line. With --workdir, they are also appended at the checkpoint's step to
WORKDIR/metrics.jsonl (existing rows are kept) and written to TensorBoard (WORKDIR, or
--tensorboard_dir).

The checkpoint is --checkpoint (a run's workdir, its checkpoints directory or one step
directory; local or gs://), else --workdir. The config is --config when given (its model must
match the checkpoint's), else the checkpoint's own. The tokenizer is always the checkpoint's.
Single host: the parameters are restored on this host, then sharded over config.mesh.
--use_ema evaluates the checkpoint's EMA of the parameters instead (a run with
config.ema_decay > 0), its metrics named as during training: 'zeroshot_ema/top1', ...
"""
import json

from absl import app
from absl import flags
from absl import logging
import jax

from basic.evaluate import run


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, "Experiment config file (default: the checkpoint's config).",
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: the checkpoint (unless --checkpoint) '
                      'and where the results go (metrics.jsonl, TensorBoard).')
  flags.DEFINE_string('checkpoint', None, 'A workdir, checkpoints directory or step directory '
                      '(local or gs://).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('tensorboard_dir', None, 'TensorBoard event files (default: --workdir).')
  flags.DEFINE_bool('use_ema', False, 'Evaluate the EMA of the parameters the checkpoint keeps '
                    "(config.ema_decay > 0); metrics named 'TASK_ema/...'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  options = flags.FLAGS
  checkpoint = options.checkpoint or options.workdir
  if checkpoint is None:
    raise app.UsageError('Give --workdir (a training run) or --checkpoint=PATH.')
  step, results = run.evaluate_checkpoint(
      checkpoint, config=options.config, workdir=options.workdir, step=options.step,
      tensorboard_dir=options.tensorboard_dir, use_ema=options.use_ema)
  if not results:
    logging.warning('The config lists no evaluation (config.eval.zeroshot is False and '
                    'config.eval.tasks is empty).')
  if jax.process_index() == 0:
    print(json.dumps({'step': step, **results}, sort_keys=True))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
