"""config.profile_steps: a jax.profiler trace of chosen steps under {workdir}/profile."""
import glob
import gzip
import json
import os
import tempfile

import jax
import pytest

from basic import config_lib
from basic import tokenizer as tokenizer_lib
from basic import train
import config_helpers

SMALL = {
    'batch_size': 16, 'microbatch_size': 16, 'total_steps': 4, 'log_every_steps': 2,
    'eval_every_steps': 4, 'checkpoint_every_steps': 4, 'data.synthetic.eval_per_class': 2,
    'tokenizer.train_sentences': 2000,
}


def _config(**overrides):
  return config_helpers.tiny_config({**SMALL, **overrides})


def test_profiled_run_writes_a_trace_of_the_chosen_steps(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(profile_steps=(2, 1))
  config.tokenizer.model_path = tokenizer_lib.ensure_tokenizer(config, tempfile.mkdtemp())
  train.train_and_evaluate(config, workdir)
  # Where TensorBoard's profile plugin looks: <run>/plugins/profile/<session>/<host>.xplane.pb.
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, traces
  assert glob.glob(os.path.join(workdir, '**', '*.xplane.pb'), recursive=True) == traces
  # It holds step 2 alone: one 'train' step annotation, step_num 1 (the finished steps before).
  with gzip.open(glob.glob(os.path.join(os.path.dirname(traces[0]), '*.trace.json.gz'))[0]) as f:
    events = json.load(f)['traceEvents']
  assert [e['args']['step_num'] for e in events if e.get('name') == 'train'] == ['1']


class _Calls:
  def __init__(self):
    self.calls = []

  def start(self, directory):
    self.calls.append(('start', directory))

  def stop(self):
    self.calls.append(('stop',))


def _steps(profiler, first, last):
  for k in range(first, last + 1):
    profiler.before(k)
    profiler.after(k, None)


def test_profiler_traces_only_its_steps_on_process_zero_and_is_off_by_default(monkeypatch):
  calls = _Calls()
  monkeypatch.setattr(jax.profiler, 'start_trace', calls.start)
  monkeypatch.setattr(jax.profiler, 'stop_trace', calls.stop)
  with train.StepProfiler(_config(), '/w') as profiler:   # Default: off.
    _steps(profiler, 1, 6)
  assert calls.calls == []
  with train.StepProfiler(_config(profile_steps=(3, 2)), '/w') as profiler:
    _steps(profiler, 1, 2)
    assert calls.calls == []
    profiler.before(3)
    assert calls.calls == [('start', '/w/profile')]
    profiler.after(3)
    profiler.before(4)
    profiler.after(4)
    assert calls.calls == [('start', '/w/profile'), ('stop',)]
    _steps(profiler, 5, 8)
  assert len(calls.calls) == 2
  with train.StepProfiler(_config(profile_steps=(3, 5)), '/w') as profiler:   # Resumed at 5,
    _steps(profiler, 5, 6)                                                   # ends at 6.
  assert calls.calls[2:] == [('start', '/w/profile'), ('stop',)]
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with train.StepProfiler(_config(profile_steps=(1, 1)), '/w') as profiler:
    _steps(profiler, 1, 2)
  assert len(calls.calls) == 4
  with train.StepProfiler(_config(profile_steps=(1, 1), profile_all_processes=True),
                          '/w') as profiler:
    _steps(profiler, 1, 2)
  assert calls.calls[4:] == [('start', '/w/profile'), ('stop',)]


@pytest.mark.parametrize('bad', [(0, 1), (2, 0), (2,), (1.5, 2), 'x'])
def test_bad_profile_steps_name_the_field(bad):
  with pytest.raises(config_lib.ConfigError, match=r'config\.profile_steps='):
    config_lib.validate(config_helpers.tiny_config({'profile_steps': bad}, type_safe=False))
