"""Metric writers: TensorBoard event files (clu) plus one JSON object per step in metrics.jsonl,
and Weights & Biases with config.wandb.project (WandbWriter).

Only process 0 writes; other processes get a writer that drops everything.

metrics.jsonl may live on GCS (objects cannot be appended to: the file is rewritten whole at each
write there, which is cheap at the size a log of scalars reaches). A run resumed at step S first
drops the rows of steps > S (written after the checkpoint it resumes from by the run that was
interrupted, and about to be written again), so the file always holds one history.
"""
import json
import os
import secrets
import string
from typing import Optional

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
WANDB_RUN_ID_FILE = 'wandb_run_id'


def _is_remote(path) -> bool:
  return '://' in str(path)


class JsonlWriter(metric_writers.MetricWriter):
  """Writes `{"step": s, "<name>": value, ...}` per write_scalars call to a JSONL file.

  Args:
    path: the file (local or gs://).
    start_step: rows of steps after this one are dropped from an existing file first (resume).
  """

  def __init__(self, path: str, start_step: int = 0):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(self._path) if self._path.exists() else []
    kept = [row for row in rows if row['step'] <= start_step]
    self._lines = [json.dumps(row) + '\n' for row in kept]
    if len(kept) != len(rows) or not self._path.exists():
      self._path.write_text(''.join(self._lines))
    self._file = None if _is_remote(self._path) else open(self._path, 'a', encoding='utf-8')

  def write_scalars(self, step, scalars):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(row) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self._path.write_text(''.join(self._lines))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


# The keys clu's ReportProgress writes at each report: its own line already gives steps/s and ETA.
PROGRESS_KEYS = ('steps_per_sec', 'uptime')
# The rows the console shows: the training loop's. An evaluation logs its own line
# (basic.evaluate.run), so its results are not printed a second time.
CONSOLE_PREFIXES = ('train/', 'data/')


class ConsoleWriter(metric_writers.LoggingWriter):
  """clu's LoggingWriter (one INFO line per write) for rows holding a key that starts with one of
  `prefixes`, less the PROGRESS_KEYS; hyperparameters are logged once, as clu logs them."""

  def __init__(self, prefixes=CONSOLE_PREFIXES):
    super().__init__()
    self._prefixes = tuple(prefixes)

  def write_scalars(self, step, scalars):
    if any(k.startswith(self._prefixes) for k in scalars):
      super().write_scalars(step, {k: v for k, v in scalars.items() if k not in PROGRESS_KEYS})


def wandb_run_id(workdir: str) -> str:
  """The wandb run id of `workdir` (local or gs://): the one in {workdir}/wandb_run_id, else a
  new random one (8 characters of [a-z0-9], as wandb makes them) written there, so that every
  restart of the workdir resumes the same run, and a new workdir starts a new one."""
  path = epath.Path(workdir) / WANDB_RUN_ID_FILE
  if path.exists():
    run_id = path.read_text().strip()
    if run_id:
      return run_id
  run_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  path.write_text(run_id + '\n')
  return run_id


class WandbWriter(metric_writers.MetricWriter):
  """Logs to one Weights & Biases run per workdir (process 0 only; see create_writer).

  The run: `project` / `entity` / `name` / `tags` / `mode` from config.wandb ('' and () = wandb's
  defaults, its environment variables included), id = wandb_run_id(workdir) with
  resume='allow' (a restart continues the run), the config as the run's config (nested, as in
  config.json). Its files go to $WANDB_DIR if set, else to the workdir when it is local, else to
  wandb's default (./wandb).

  What it logs, at wandb step = the training step: every write_scalars row with the names and
  values TensorBoard and metrics.jsonl get; images ([N, H, W, C]) as lists of wandb.Image;
  histograms as wandb.Histogram (num_buckets, default 64); texts as strings; hparams: those the
  run's config lacks (`num_params`: the config's fields are there from the start). Videos, audios
  and summaries are dropped (basic writes none). wandb drops a row whose step is below the
  run's last (with a warning): after a resume from step S, the steps the interrupted run had
  logged past S keep their first values (equal up to the resume's exactness, see README).

  wandb never stops training: if wandb.init fails (no API key, no server within its
  init_timeout, WANDB_INIT_TIMEOUT) the run is made in mode='offline' instead (`wandb sync` it
  later), and if that fails too, or any later call raises, the error is logged (the first with
  its traceback) and wandb is skipped. close() waits for the upload unless WANDB_FINISH_TIMEOUT
  is set.
  """

  def __init__(self, workdir: str, config):
    import wandb  # pylint: disable=g-import-not-at-top  (only with config.wandb.project)
    from basic import config_lib  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    self._config_keys = set(config_lib.flatten(config))
    self._failures = 0
    c = config.wandb
    local = not _is_remote(workdir)
    kwargs = dict(
        project=c.project, entity=c.entity or None, name=c.name or None,
        tags=list(c.tags) or None, id=wandb_run_id(workdir), resume='allow',
        config=json.loads(config_lib.to_json(config)),
        dir=str(workdir) if local and not os.environ.get('WANDB_DIR') else None)
    self._run = None
    for mode in [c.mode or None] + (['offline'] if c.mode != 'offline' else []):
      try:
        self._run = wandb.init(mode=mode, **kwargs)
        break
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('wandb.init(mode=%r) failed (%s: %s)%s', mode, type(e).__name__, e,
                        '; trying mode=\'offline\'.' if mode != 'offline' else
                        '; training continues without wandb.')
        # The failed run keeps its id in wandb's service ("run ID ... is in use"): a new one.
        self._call_quietly(wandb.teardown)
    if self._run is not None:
      logging.info('wandb run %s (%s): %s', self._run.id, self._run.settings.mode,
                   self._run.url or self._run.dir)

  @staticmethod
  def _call_quietly(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s failed: %s: %s', fn.__name__, type(e).__name__, e)

  @property
  def run(self):
    """The wandb Run (None if wandb.init failed)."""
    return self._run

  def _call(self, fn):
    """fn(), an exception logged (the first with its traceback), never raised."""
    if self._run is None:
      return
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      self._failures += 1
      if self._failures == 1:
        logging.exception('wandb failed (training continues; later failures logged in short)')
      else:
        logging.warning('wandb failed again (%d times): %s: %s', self._failures,
                        type(e).__name__, e)

  def _log(self, step, row):
    self._call(lambda: self._run.log(row, step=int(step)))

  def write_scalars(self, step, scalars):
    self._log(step, {k: float(np.asarray(v)) for k, v in scalars.items()})

  def write_images(self, step, images):
    self._log(step, {k: [self._wandb.Image(np.asarray(x)) for x in v] for k, v in images.items()})

  def write_texts(self, step, texts):
    self._log(step, {k: str(v) for k, v in texts.items()})

  def write_histograms(self, step, arrays, num_buckets=None):
    self._log(step, {k: self._wandb.Histogram(np.asarray(v), num_bins=num_buckets or 64)
                     for k, v in arrays.items()})

  def write_hparams(self, hparams):
    new = {k: v for k, v in hparams.items() if k not in self._config_keys}
    if new:
      self._call(lambda: self._run.config.update(new, allow_val_change=True))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def flush(self):
    pass   # wandb sends in the background; run.finish (close) waits for it.

  def close(self):
    """run.finish, then wandb.teardown: wandb-core writes the run's .wandb file in the
    background (flushed every 15 s) and may not have finished it when finish returns; teardown
    waits for its service process to exit (basic.main ends the process with os._exit, which
    skips wandb's own atexit teardown). It ends any other wandb run of the process too."""
    if self._run is not None:
      self._call(self._run.finish)
      self._run = None
      self._call_quietly(self._wandb.teardown)


def create_writer(workdir: str, *, start_step: int = 0, tensorboard_dir: Optional[str] = None,
                  config=None):
  """TensorBoard + console logging (`ConsoleWriter`) + metrics.jsonl on process 0, and
  Weights & Biases (`WandbWriter`) with config.wandb.project; a no-op writer elsewhere.

  Args:
    workdir: metrics.jsonl goes here (local or gs://).
    start_step: the step the run starts (or resumes) at; see JsonlWriter.
    tensorboard_dir: TensorBoard event files (default: workdir). TensorFlow writes them, through
      its own GCS client for gs:// paths (real GCS only: it cannot be pointed at an emulator).
    config: the run's config; wandb is imported only when it sets config.wandb.project.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  writers = [
      ConsoleWriter(),
      metric_writers.SummaryWriter(str(tensorboard_dir or workdir)),
      JsonlWriter(str(epath.Path(workdir) / METRICS_FILE), start_step),
  ]
  if config is not None and config.wandb.project:
    writers.append(WandbWriter(workdir, config))
  return metric_writers.MultiWriter(writers)


def read_jsonl(path) -> list:
  """Reads metrics.jsonl (local or gs://) back as a list of dicts."""
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
