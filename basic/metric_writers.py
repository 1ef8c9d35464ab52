"""Metric writers: TensorBoard event files (clu) plus one JSON object per step in metrics.jsonl.

Only process 0 writes; other processes get a writer that drops everything.
"""
import json
import os

from clu import metric_writers
import jax
import numpy as np


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, "<name>": value, ...}` per write_scalars call to a JSONL file."""

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    self._file = open(path, 'a', encoding='utf-8')

  def write_scalars(self, step, scalars):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

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
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str):
  """TensorBoard + console logging + metrics.jsonl in `workdir` on process 0; a no-op elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])


def read_jsonl(path: str):
  """Reads metrics.jsonl back as a list of dicts."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
