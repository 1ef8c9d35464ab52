r"""Gradient cache: time ratio and peak memory; not part of the test suite.

  python -m benchmarks.gradcache [--out=BENCHMARKS.md]

Measures
  (a) the time of a gradient-cached step (K microbatches) over the time of a
      plain full-batch step, at a batch where both fit;
  (b) the peak RSS of a fresh process running one gradient-cached step at two
      batch sizes with the same microbatch size and the loss chunk c * N held
      fixed, so that the growth of the peak can be accounted term by term.
It prints a markdown table; with --out it replaces (or appends) the section
`## gradcache` of that markdown file.

The step is basic.train's own train step on the towers of configs/tiny.py.
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import flags
import jax

from benchmarks import common
from configs import tiny

FLAGS = flags.FLAGS
# (a) Time ratio.
flags.DEFINE_integer('time_batch_size', 2048, 'N of the timing comparison.')
flags.DEFINE_integer('time_num_microbatches', 8, 'K of the cached step.')
flags.DEFINE_integer('repeats', 5, 'Timed steps after compilation.')
# (b) Peak memory.
flags.DEFINE_list('rss_batch_sizes', ['8192', '65536'], 'N of each RSS point.')
flags.DEFINE_integer('microbatch_size', 512, 'm of every RSS point.')
flags.DEFINE_integer('log2_chunk_elements', 23,
                     'c * N = 2**this: the loss chunk c is 2**this // N.')
# Worker mode, used by (b) in a fresh subprocess.
flags.DEFINE_bool('worker', False, 'Run one step at --batch_size / --num_microbatches / '
                  '--chunk_size and print its measurements as a JSON line.')
flags.DEFINE_integer('batch_size', None, 'N of a single worker step.')
flags.DEFINE_integer('num_microbatches', None, 'K of a single worker step.')
flags.DEFINE_integer('chunk_size', None, 'c of a single worker step.')

MODULE = 'benchmarks.gradcache'
GIB = 2**30


def make_step(batch_size, microbatch_size, chunk_size, unroll=1):
  """The real training step of configs/tiny.py at (N, m, c), with its state and a batch.

  Returns (compiled-able jitted step, state, batch, rng): one full step of basic.train
  (gradient-cached loss and gradients, AdamW update) on the tiny ViT + Transformer towers.
  """
  config = tiny.get_config()
  config.batch_size, config.microbatch_size = batch_size, microbatch_size
  config.loss_chunk_size = chunk_size
  config.gradcache_unroll = unroll
  step, state, batch, rng, _ = common.train_step(config, batch_size)
  return step, state, batch, rng


def _chunk_size(batch_size):
  return max(1, 2**FLAGS.log2_chunk_elements // batch_size)


def _peak_rss_bytes():
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_hwm_bytes():
  """Peak RSS of this process image (VmHWM); unlike ru_maxrss, exec resets it."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return None


def time_ratio():
  """(a): median seconds of the plain (K=1) and the cached (K) step, and their ratio."""
  n, k = FLAGS.time_batch_size, FLAGS.time_num_microbatches
  chunk = _chunk_size(n)
  step, state, batch, rng = make_step(n, n, chunk)
  batch = jax.device_put(batch)
  plain = common.median_step_s(step, state, batch, rng, FLAGS.repeats)
  rows = []
  for unroll in (k, 1):  # Fully unrolled (the CPU setting), then a rolled loop.
    step, state, _, rng = make_step(n, n // k, chunk, unroll)
    cached = common.median_step_s(step, state, batch, rng, FLAGS.repeats)
    rows.append({'batch_size': n, 'num_microbatches': k, 'chunk_size': chunk, 'unroll': unroll,
                 'plain_s': plain, 'cached_s': cached, 'ratio': cached / plain})
  return rows


def worker():
  """One step in this (fresh) process; prints a JSON line of measurements."""
  n, k, chunk = FLAGS.batch_size, FLAGS.num_microbatches, FLAGS.chunk_size
  rss_start = _peak_rss_bytes()
  step, state, batch, rng = make_step(n, n // k, chunk)
  batch_bytes = sum(x.nbytes for x in batch.values())
  batch = jax.device_put(batch)
  compiled = step.lower(state, batch, rng).compile()
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, 'temp_size_in_bytes', None)
  rss_before = _peak_rss_bytes()
  start = time.perf_counter()
  jax.block_until_ready(compiled(state, batch, rng))
  seconds = time.perf_counter() - start
  print(json.dumps({
      'batch_size': n, 'num_microbatches': k, 'chunk_size': chunk,
      'step_s': seconds, 'batch_bytes': batch_bytes,
      'xla_temp_bytes': temp_bytes, 'rss_start_bytes': rss_start,
      'rss_before_step_bytes': rss_before, 'peak_rss_bytes': _peak_rss_bytes(),
      'vm_hwm_bytes': _vm_hwm_bytes(),
  }))


def peak_rss(batch_size):
  """(b): runs `worker` for one batch size in a fresh subprocess.

  Linux carries ru_maxrss over fork and exec, so a child's value is at least
  its parent's RSS at the fork: call this before the parent grows (it runs
  before the timing); the worker also reports VmHWM, which exec resets.
  """
  m = FLAGS.microbatch_size
  if batch_size % m:
    raise ValueError(f'batch_size={batch_size} is not a multiple of '
                     f'microbatch_size={m}.')
  cmd = [sys.executable, '-m', MODULE, '--worker',
         f'--batch_size={batch_size}', f'--num_microbatches={batch_size // m}',
         f'--chunk_size={_chunk_size(batch_size)}']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=repo,
                       env=dict(os.environ)).stdout
  return json.loads(out.strip().splitlines()[-1])


def _gib(x):
  return f'{x / GIB:.2f}' if x is not None else 'n/a'


def report(timing, points, command):
  """The markdown section `## gradcache`."""
  lines = [
      '## gradcache', '',
      f'Command: `{command}`', '',
      f'Device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores. '
      'One full training step of `configs/tiny.py` (its ViT and Transformer towers, '
      f'd={tiny.get_config().model.embed_dim}): gradient-cached loss and gradients with the '
      'chunked softmax loss, then the AdamW update.',
      '', '(a) Time of a cached step over a plain full-batch step '
      f'(median of {FLAGS.repeats} after compilation):', '',
      '| N | K | c | gradcache_unroll | plain (s) | cached (s) | cached / plain |',
      '|---|---|---|---|---|---|---|',
      *[f"| {t['batch_size']} | {t['num_microbatches']} | {t['chunk_size']} | {t['unroll']} | "
        f"{t['plain_s']:.3f} | {t['cached_s']:.3f} | {t['ratio']:.2f} |" for t in timing], '',
      'On XLA:CPU the ops of a loop body run slower than the same ops unrolled, so the rolled '
      'loop (gradcache_unroll=1, the right setting on accelerators) is the slower row here; the '
      'unrolled row is the CPU setting. Theory: about 4/3 (one extra forward pass).',
      '',
      '(b) Peak RSS (`ru_maxrss`; VmHWM as a check) of a fresh process '
      f'running one cached step, m={FLAGS.microbatch_size}, '
      f'c = 2^{FLAGS.log2_chunk_elements} / N:', '',
      '| N | K | c | step (s) | input batch (GiB) | XLA temp (GiB) '
      '| RSS after import (GiB) | RSS before step (GiB) | peak RSS (GiB) '
      '| VmHWM (GiB) |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for p in points:
    lines.append(
        f"| {p['batch_size']} | {p['num_microbatches']} | {p['chunk_size']} | "
        f"{p['step_s']:.1f} | {_gib(p['batch_bytes'])} | "
        f"{_gib(p['xla_temp_bytes'])} | {_gib(p['rss_start_bytes'])} | "
        f"{_gib(p['rss_before_step_bytes'])} | {_gib(p['peak_rss_bytes'])} | "
        f"{_gib(p['vm_hwm_bytes'])} |")
  return '\n'.join(lines) + '\n'


def gradcache_section(command):
  """The section `## gradcache` ((b) first, before this process grows); None in worker mode."""
  if FLAGS.worker:
    worker()
    return None
  points = [peak_rss(int(n)) for n in FLAGS.rss_batch_sizes]
  return report(time_ratio(), points, command)


if __name__ == '__main__':
  common.run(MODULE, gradcache_section)
