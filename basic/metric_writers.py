"""Metric writers: TensorBoard event files (clu) plus one JSON object per step in metrics.jsonl.

Only process 0 writes; other processes get a writer that drops everything.

metrics.jsonl may live on GCS (objects cannot be appended to: the file is rewritten whole at each
write there, which is cheap at the size a log of scalars reaches). A run resumed at step S first
drops the rows of steps > S (written after the checkpoint it resumes from by the run that was
interrupted, and about to be written again), so the file always holds one history.
"""
import json
from typing import Optional

from clu import metric_writers
from etils import epath
import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'


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


def create_writer(workdir: str, *, start_step: int = 0, tensorboard_dir: Optional[str] = None):
  """TensorBoard + console logging (`ConsoleWriter`) + metrics.jsonl on process 0; a no-op writer
  elsewhere.

  Args:
    workdir: metrics.jsonl goes here (local or gs://).
    start_step: the step the run starts (or resumes) at; see JsonlWriter.
    tensorboard_dir: TensorBoard event files (default: workdir). TensorFlow writes them, through
      its own GCS client for gs:// paths (real GCS only: it cannot be pointed at an emulator).
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      ConsoleWriter(),
      metric_writers.SummaryWriter(str(tensorboard_dir or workdir)),
      JsonlWriter(str(epath.Path(workdir) / METRICS_FILE), start_step),
  ])


def read_jsonl(path) -> list:
  """Reads metrics.jsonl (local or gs://) back as a list of dicts."""
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
