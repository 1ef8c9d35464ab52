r"""The command line of training: `python -m basic.train --config=configs/tiny.py --workdir=DIR`.

The flags live here; basic/train.py is a flag-free library (`train_and_evaluate(config, workdir)`)
whose `python -m basic.train` entry point runs `main` below. Any config field can be overridden,
e.g. `--config.total_steps=50 --config.batch_size=128`. Running the same command again resumes
from the latest checkpoint in `DIR/checkpoints`.

The console. By default it shows basic's own lines (progress with steps/s and ETA, the logged
metrics, one line per evaluation and per checkpoint save) and every warning and error from
anywhere; the INFO chatter of libraries (orbax's save internals, absl, JAX, TensorFlow's Python
side) is dropped from the console. Giving absl's `--verbosity` flag turns that filter off:
`--verbosity=0` shows every library's INFO lines as before, `--verbosity=1` adds debug lines.
TensorFlow's C++ start-up lines, printed before any Python logging is set up, are not affected.
"""
import logging as py_logging
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from basic import config_defaults
from basic import failures
from basic import multihost
from basic import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints and logs (local or gs://bucket/...).')
_TENSORBOARD_DIR = flags.DEFINE_string(
    'tensorboard_dir', None, 'TensorBoard event files (default: --workdir).')
# Multi-process runs on GPU/CPU clusters (TPU pods are detected automatically); see
# basic/multihost.py and launch/local.py.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of the jax.distributed coordinator (process 0).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index.")

_BASIC_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Library files whose INFO lines are basic's console: clu's progress line (steps/s, ETA), and
# its logging writer, which prints the metrics basic writes (basic.metric_writers).
_KEPT_LIBRARY_FILES = (os.path.join('clu', 'platform', 'local.py'),
                       os.path.join('clu', 'metric_writers', 'logging_writer.py'))


class ConsoleFilter(py_logging.Filter):
  """Keeps warnings and errors from anywhere, and INFO lines from basic's own files (and the
  clu files that print its progress and metrics); drops the INFO lines of other libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_BASIC_DIR) or path.endswith(_KEPT_LIBRARY_FILES)


def quiet_libraries():
  """Installs `ConsoleFilter` on absl's handler, unless absl's --verbosity flag was given on the
  command line: then absl's level alone decides, and every library's lines show as before."""
  if flags.FLAGS['verbosity'].present:
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
    handler.addFilter(ConsoleFilter())


def main(argv):
  """Trains `--config` in `--workdir`; exits non-zero on any failure (basic.failures)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required.')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/tiny.py.')
  config = config_defaults.fill(_CONFIG.value)   # Fields the config file lacks: their defaults.
  quiet_libraries()

  def run():
    multihost.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        heartbeat_timeout_s=config.distributed_heartbeat_timeout_s,
        peer_poll_s=config.peer_poll_s)
    logging.info('JAX devices: %s; process %d of %d.', jax.devices(), jax.process_index(),
                 jax.process_count())
    results = train.train_and_evaluate(config, _WORKDIR.value,
                                       tensorboard_dir=_TENSORBOARD_DIR.value)
    if results:
      print(' '.join(f'{k}={v:.4f}' for k, v in sorted(results.items())))
    delay = config.debug_finish_delay_s
    if delay and jax.process_index() == 0:
      time.sleep(delay)    # Fault injection: process 0 finishes late.
    multihost.shutdown()   # Every process leaves together, before the teardown watchdog.

  # Any exception: logged, then the process exits non-zero within config.shutdown_timeout_s,
  # and the other processes of the run exit too (basic.failures).
  failures.run_main(run, timeout_s=config.shutdown_timeout_s,
                    process_index=jax.process_index, exit_on_success=True)


def run():
  """`python -m basic.train` (and `python -m basic.main`): parses the flags, runs `main`."""
  app.run(main)


if __name__ == '__main__':
  run()
