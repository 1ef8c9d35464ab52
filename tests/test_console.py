"""The console of `python -m basic.train` (basic.main): basic's lines and every warning kept,
library INFO chatter dropped unless --verbosity asks for it; the console metric writer."""
import logging
import os

from absl import flags
from absl import logging as absl_logging

from basic import main
from basic import metric_writers


def _record(path, level=logging.INFO):
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_console_filter_keeps_basic_progress_and_warnings_drops_library_info():
  keep = main.ConsoleFilter().filter
  basic_dir = os.path.dirname(os.path.abspath(main.__file__))
  orbax = '/venv/site-packages/orbax/checkpoint/_src/checkpoint_managers/checkpoint_manager.py'
  assert keep(_record(os.path.join(basic_dir, 'train.py')))
  assert keep(_record(os.path.join(basic_dir, 'checkpoint.py')))
  assert keep(_record('/venv/site-packages/clu/platform/local.py'))          # steps/s, ETA.
  assert keep(_record('/venv/site-packages/clu/metric_writers/logging_writer.py'))
  assert not keep(_record(orbax))
  assert not keep(_record('/venv/site-packages/orbax/checkpoint/checkpoint.py'))
  assert keep(_record(orbax, logging.WARNING))
  assert keep(_record(orbax, logging.ERROR))


def test_giving_verbosity_turns_the_filter_off():
  handler = absl_logging.get_absl_handler()
  verbosity = flags.FLAGS['verbosity']
  before, present = list(handler.filters), verbosity.present
  try:
    verbosity.present = 1     # --verbosity=0 given: every library's INFO lines, as before.
    main.quiet_libraries()
    assert not any(isinstance(f, main.ConsoleFilter) for f in handler.filters)
    verbosity.present = 0     # Not given: the filter.
    main.quiet_libraries()
    main.quiet_libraries()    # Idempotent.
    assert sum(isinstance(f, main.ConsoleFilter) for f in handler.filters) == 1
  finally:
    for f in list(handler.filters):
      if f not in before:
        handler.removeFilter(f)
    verbosity.present = present


def test_console_writer_logs_training_rows_without_progress_keys(monkeypatch):
  lines = []
  monkeypatch.setattr(absl_logging, 'info', lambda msg, *args: lines.append(msg % args))
  writer = metric_writers.ConsoleWriter()
  writer.write_scalars(5, {'steps_per_sec': 2.0, 'uptime': 3.0})              # ReportProgress.
  writer.write_scalars(5, {'zeroshot/top1': 0.5})                              # Logged by run.py.
  writer.write_scalars(5, {'train/loss': 1.0, 'data/dropped': 0, 'steps_per_sec': 2.0})
  assert len(lines) == 1 and 'train/loss=1' in lines[0] and 'steps_per_sec' not in lines[0]
