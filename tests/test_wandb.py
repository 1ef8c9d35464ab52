"""config.wandb: Weights & Biases logging (basic.metric_writers.WandbWriter), offline.

wandb runs in offline mode with every directory it writes under tmp_path, no console capture,
no system metrics, no git or code snapshot; wandb.teardown() stops its service process after each
test, so no child process outlives it. Nothing is sent anywhere: the "server" of the fallback test
is a closed port on 127.0.0.1.

(1) A 2-step tiny run, then a restart's writers in the same workdir: both wandb runs have the
id stored in {workdir}/wandb_run_id, and their offline history (the .wandb files, read back with
`read_wandb_file`: wandb's leveldb-style log of protobuf Records, as wandb 0.31 writes it) holds
at each step exactly the scalars metrics.jsonl holds, equal as floats. (2) An unreachable server
falls back to an offline run, and a failing wandb call is logged, not raised. (3) With
config.wandb.project unset, wandb is not imported (a fresh interpreter). (4) Bad fields fail
naming them.
"""
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile

import psutil
import pytest

from basic import config_lib
from basic import metric_writers
from basic import tokenizer as tokenizer_lib
from basic import train
import config_helpers

wandb = pytest.importorskip('wandb')   # In the test extra: runs in CI.
from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    'batch_size': 16, 'microbatch_size': 16, 'total_steps': 2, 'log_every_steps': 1,
    'eval_every_steps': 2, 'checkpoint_every_steps': 2, 'data.synthetic.eval_per_class': 2,
    'tokenizer.train_sentences': 2000, 'wandb.project': 'basic-test', 'wandb.name': 'tiny',
    'wandb.tags': ('test', 'offline'),
}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  """wandb offline, its every directory under tmp_path; its service stopped afterwards."""
  root = tmp_path / 'wandb_dir'
  root.mkdir()
  for name in ('WANDB_DIR', 'WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR',
               'WANDB_ARTIFACT_DIR'):
    monkeypatch.setenv(name, str(root))
  for name, value in (('WANDB_MODE', 'offline'), ('WANDB_SILENT', 'true'),
                      ('WANDB_CONSOLE', 'off'), ('WANDB_DISABLE_GIT', 'true'),
                      ('WANDB_DISABLE_CODE', 'true'), ('WANDB__DISABLE_STATS', 'true'),
                      ('WANDB__DISABLE_MACHINE_INFO', 'true'),
                      ('WANDB__SAVE_REQUIREMENTS', 'false')):
    monkeypatch.setenv(name, value)
  for name in ('WANDB_API_KEY', 'WANDB_PROJECT', 'WANDB_ENTITY', 'WANDB_RUN_ID', 'WANDB_RESUME',
               'WANDB_BASE_URL'):
    monkeypatch.delenv(name, raising=False)
  yield root
  wandb.teardown()
  left = [p.name() for p in psutil.Process().children(recursive=True)
          if 'wandb' in ' '.join(p.cmdline())]
  assert not left, f'wandb processes left running: {left}'


def read_wandb_file(path) -> list:
  """The Records of a .wandb file: a 7-byte header (':W&B', magic 0xBEE1, version 0), then
  32 KiB blocks of chunks, each a 7-byte header (crc32c, length uint16, type uint8: 1 full,
  2 first, 3 middle, 4 last) and its bytes; a block's tail shorter than 7 bytes is padding.
  (The checksums are not verified.)"""
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B' and struct.unpack('<HB', data[4:7]) == (0xBEE1, 0), data[:7]
  records, pos, parts = [], 7, []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if kind == 0 and length == 0:
      break   # Zero fill at the end of a block being written.
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):   # full or last: a whole Record.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b''.join(parts))
      records.append(record)
      parts = []
  return records


def history(records) -> dict:
  """{step: {key: value}} of the history Records (wandb's own keys, '_step' ..., left out)."""
  out = {}
  for record in records:
    if record.WhichOneof('record_type') == 'history':
      row = {(item.key or '/'.join(item.nested_key)): json.loads(item.value_json)
             for item in record.history.item}
      out.setdefault(row['_step'], {}).update(
          {k: v for k, v in row.items() if not k.startswith('_')})
  return out


def _jsonl_by_step(workdir) -> dict:
  out = {}
  for row in metric_writers.read_jsonl(os.path.join(workdir, metric_writers.METRICS_FILE)):
    out.setdefault(row.pop('step'), {}).update(row)
  return out


def _run_records(root, run_id: str) -> list:
  """The .wandb files of run `run_id` under the wandb dir, oldest first."""
  files = sorted(glob.glob(os.path.join(root, 'wandb', f'offline-run-*-{run_id}*',
                                        f'run-{run_id}.wandb')))
  return [read_wandb_file(f) for f in files]


def test_offline_run_logs_the_scalars_and_a_restart_resumes_its_id(tmp_path, offline_wandb):
  workdir = str(tmp_path / 'run')
  config = config_helpers.tiny_config(SMALL)
  config.tokenizer.model_path = tokenizer_lib.ensure_tokenizer(config, tempfile.mkdtemp())
  train.train_and_evaluate(config, workdir)
  run_id = open(os.path.join(workdir, metric_writers.WANDB_RUN_ID_FILE)).read().strip()
  assert len(run_id) == 8, run_id
  # The restart (its writers, as train_and_evaluate makes them when it resumes at step 2).
  writer = metric_writers.create_writer(workdir, start_step=2, config=config)
  writer.write_scalars(3, {'train/loss': 1.25})
  writer.close()
  assert open(os.path.join(workdir, metric_writers.WANDB_RUN_ID_FILE)).read().strip() == run_id

  runs = _run_records(offline_wandb, run_id)
  assert len(runs) == 2, runs   # One offline run directory per start, both with the same id.
  for records in runs:
    run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (
        run_id, 'basic-test', 'tiny', ['test', 'offline'])
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config['wandb']['project'] == 'basic-test'
    assert logged_config['batch_size'] == 16 and logged_config['total_steps'] == 2
  # Every scalar of metrics.jsonl, at its step, with the same value (and nothing else).
  want = _jsonl_by_step(workdir)
  got = {**history(runs[0]), **history(runs[1])}
  assert sorted(want) == sorted(got) == [1, 2, 3]
  assert set(want[2]) >= {'train/loss', 'train/learning_rate', 'zeroshot/top1'}, want[2]
  for step in want:
    assert got[step] == want[step], (step, got[step], want[step])
  assert sorted(history(runs[1])) == [3]   # The restart's own step.


def test_unreachable_server_falls_back_to_offline_and_failures_are_logged(
    tmp_path, offline_wandb, monkeypatch, caplog):
  # Online, to a closed port: wandb.init fails after WANDB_INIT_TIMEOUT seconds.
  monkeypatch.setenv('WANDB_MODE', 'online')
  monkeypatch.setenv('WANDB_API_KEY', 'x' * 86)
  monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('WANDB_INIT_TIMEOUT', '3')
  config = config_helpers.tiny_config(SMALL)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  writer = metric_writers.WandbWriter(workdir, config)
  assert writer.run is not None and writer.run.settings.mode == 'offline'
  assert any("trying mode='offline'" in r.getMessage() for r in caplog.records)
  writer.write_scalars(1, {'train/loss': 2.5})

  def broken(*args, **kwargs):
    raise ConnectionError('no route to the server')
  with monkeypatch.context() as patch:
    patch.setattr(writer.run, 'log', broken)
    writer.write_scalars(2, {'train/loss': 2.0})   # Logged, not raised.
    writer.write_scalars(3, {'train/loss': 1.5})
  assert sum('wandb failed' in r.getMessage() for r in caplog.records) == 2
  writer.close()
  assert writer.run is None
  [records] = _run_records(offline_wandb, metric_writers.wandb_run_id(workdir))
  assert history(records) == {1: {'train/loss': 2.5}}


def test_unset_project_imports_no_wandb(tmp_path):
  code = f"""
import sys
from basic import config_lib, metric_writers
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
import config_helpers
config = config_helpers.tiny_config({{}})
assert config.wandb.project == ''
config_lib.validate(config)
writer = metric_writers.create_writer({str(tmp_path)!r}, config=config)
writer.write_scalars(1, {{'train/loss': 1.0}})
writer.close()
assert 'wandb' not in sys.modules, 'wandb imported'
"""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True,
                 stdout=subprocess.DEVNULL)
  files = os.listdir(tmp_path)   # No wandb_run_id, no wandb/ directory.
  assert sorted(files) == sorted([metric_writers.METRICS_FILE] + [
      f for f in files if f.startswith('events.out.tfevents')]), files


def test_bad_wandb_fields_fail_naming_the_field(monkeypatch):
  def check(fields, match):
    config = config_helpers.tiny_config(fields, type_safe=False)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(config)

  check({'wandb.project': 'p', 'wandb.mode': 'cloud'}, r"config\.wandb\.mode='cloud'")
  check({'wandb.project': 'p', 'wandb.tags': 'a,b'}, r"config\.wandb\.tags='a,b'")
  check({'wandb.project': 3}, r'config\.wandb\.project=3: must be a string')
  check({'wandb.name': 'x'}, r"config\.wandb\.name='x': set without config\.wandb\.project")
  config_lib.validate(config_helpers.tiny_config({'wandb.project': 'p', 'wandb.mode': 'offline'}))
  import importlib.util  # pylint: disable=g-import-not-at-top
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else find_spec(name, *a))
  check({'wandb.project': 'p'}, r"config\.wandb\.project='p'.*pip install '\.\[wandb\]'")
