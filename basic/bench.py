r"""Benchmarks; not part of the test suite.

Usage:

  python -m basic.bench gradcache [--out=BENCHMARKS.md]

`gradcache` measures
  (a) the time of a gradient-cached step (K microbatches) over the time of a
      plain full-batch step, at a batch where both fit;
  (b) the peak RSS of a fresh process running one gradient-cached step at two
      batch sizes with the same microbatch size and the loss chunk c * N held
      fixed, so that the growth of the peak can be accounted term by term.
It prints a markdown table; with --out it replaces (or appends) the section
`## gradcache` of that markdown file.

The model comes from `make_model` alone; replace it to benchmark real towers.
"""

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from basic import contrastive
from basic import gradcache

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Markdown file whose `## gradcache` section '
                    'is replaced (or appended) with the results.')
# (a) Time ratio.
flags.DEFINE_integer('time_batch_size', 4096, 'N of the timing comparison.')
flags.DEFINE_integer('time_num_microbatches', 8, 'K of the cached step.')
flags.DEFINE_integer('repeats', 5, 'Timed steps after compilation.')
# (b) Peak memory.
flags.DEFINE_list('rss_batch_sizes', ['8192', '65536'], 'N of each RSS point.')
flags.DEFINE_integer('microbatch_size', 1024, 'm of every RSS point.')
flags.DEFINE_integer('log2_chunk_elements', 23,
                     'c * N = 2**this: the loss chunk c is 2**this // N.')
# Worker mode, used by (b) in a fresh subprocess.
flags.DEFINE_integer('batch_size', None, 'N of a single worker step.')
flags.DEFINE_integer('num_microbatches', None, 'K of a single worker step.')
flags.DEFINE_integer('chunk_size', None, 'c of a single worker step.')

# The tiny model and its synthetic data.
IMAGE_SHAPE = (32, 32, 3)
TEXT_LEN = 16
VOCAB_SIZE = 1024
HIDDEN = 256
EMBED_DIM = 128
DROPOUT = 0.1
TEMPERATURE = 0.07
LEARNING_RATE = 0.1
GIB = 2**30


class _MlpTower(nn.Module):
  """(m, ...) inputs -> (m, EMBED_DIM) unit vectors."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    x = nn.Dropout(DROPOUT, deterministic=False)(x)
    x = nn.Dense(EMBED_DIM)(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class _TinyDualEncoder(nn.Module):
  """uint8 images (m, 32, 32, 3) and int32 tokens (m, TEXT_LEN) -> embeddings."""

  @nn.compact
  def __call__(self, batch):
    self.param('log_temperature', lambda _: jnp.log(jnp.float32(TEMPERATURE)))
    images = batch['image'].astype(jnp.float32) / np.iinfo(np.uint8).max
    tokens = nn.Embed(VOCAB_SIZE, HIDDEN)(batch['text']).mean(axis=1)
    return _MlpTower()(images), _MlpTower()(tokens)


def make_model(rng):
  """Returns (encode_fn, params, make_batch) of the benchmarked dual encoder.

  encode_fn(params, batch, rng) -> (image_emb (m, d), text_emb (m, d));
  make_batch(n) -> {'image': (n, 32, 32, 3) uint8, 'text': (n, L) int32}.
  """
  model = _TinyDualEncoder()

  def make_batch(n, seed=0):
    np_rng = np.random.default_rng(seed)
    return {
        'image': np_rng.integers(0, np.iinfo(np.uint8).max, (n, *IMAGE_SHAPE),
                                 dtype=np.uint8),
        'text': np_rng.integers(0, VOCAB_SIZE, (n, TEXT_LEN), dtype=np.int32),
    }

  init_rng, dropout_rng = jax.random.split(rng)
  params = jax.jit(model.init)({'params': init_rng, 'dropout': dropout_rng},
                               make_batch(1))['params']

  def encode_fn(p, batch, rng):
    return model.apply({'params': p}, batch, rngs={'dropout': rng})

  return encode_fn, params, make_batch


def make_step(encode_fn, num_microbatches, chunk_size):
  """(params, batch, rng) -> (params, loss): gradient-cached step plus SGD."""

  def loss_fn(params, image_emb, text_emb):
    return contrastive.softmax_loss(image_emb, text_emb,
                                    jnp.exp(params['log_temperature']),
                                    chunk_size=chunk_size)

  grad_fn = gradcache.value_and_grad(encode_fn, loss_fn,
                                     num_microbatches=num_microbatches)

  def step(params, batch, rng):
    loss, grads = grad_fn(params, batch, rng)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, loss

  return jax.jit(step)


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


def _time_steps(step, params, batch, rng, repeats):
  """Compiles, then returns the median wall time of `repeats` steps."""
  jax.block_until_ready(step(params, batch, rng))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, batch, jax.random.fold_in(rng, i)))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_ratio():
  """(a): median seconds of the plain and the cached step and their ratio."""
  n, k = FLAGS.time_batch_size, FLAGS.time_num_microbatches
  chunk = _chunk_size(n)
  rng = jax.random.key(0)
  encode_fn, params, make_batch = make_model(rng)
  batch = jax.device_put(make_batch(n))
  plain = _time_steps(make_step(encode_fn, 1, chunk), params, batch, rng,
                      FLAGS.repeats)
  cached = _time_steps(make_step(encode_fn, k, chunk), params, batch, rng,
                       FLAGS.repeats)
  return {'batch_size': n, 'num_microbatches': k, 'chunk_size': chunk,
          'plain_s': plain, 'cached_s': cached, 'ratio': cached / plain}


def worker():
  """One step in this (fresh) process; prints a JSON line of measurements."""
  n, k, chunk = FLAGS.batch_size, FLAGS.num_microbatches, FLAGS.chunk_size
  rss_start = _peak_rss_bytes()
  rng = jax.random.key(0)
  encode_fn, params, make_batch = make_model(rng)
  batch = make_batch(n)
  batch_bytes = sum(x.nbytes for x in batch.values())
  batch = jax.device_put(batch)
  compiled = make_step(encode_fn, k, chunk).lower(params, batch, rng).compile()
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, 'temp_size_in_bytes', None)
  rss_before = _peak_rss_bytes()
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, batch, rng))
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
  cmd = [sys.executable, '-m', 'basic.bench', 'gradcache_worker',
         f'--batch_size={batch_size}', f'--num_microbatches={batch_size // m}',
         f'--chunk_size={_chunk_size(batch_size)}']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
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
      'Tiny MLP dual encoder (32x32x3 uint8 images, '
      f'{TEXT_LEN} int32 tokens, hidden {HIDDEN}, d={EMBED_DIM}, dropout '
      f'{DROPOUT}), chunked softmax loss, step = loss + grads + SGD update.',
      '', '(a) Time of a cached step over a plain full-batch step '
      f'(median of {FLAGS.repeats} after compilation):', '',
      '| N | K | c | plain (s) | cached (s) | cached / plain |',
      '|---|---|---|---|---|---|',
      f"| {timing['batch_size']} | {timing['num_microbatches']} | "
      f"{timing['chunk_size']} | {timing['plain_s']:.3f} | "
      f"{timing['cached_s']:.3f} | {timing['ratio']:.2f} |", '',
      '(b) Peak RSS (`ru_maxrss`; VmHWM as a check) of a fresh process '
      f'running one cached step, m={FLAGS.microbatch_size}, '
      f'c = 2^{FLAGS.log2_chunk_elements} / N, d={EMBED_DIM}:', '',
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


def write_section(path, section):
  """Replaces the `## gradcache` section of `path`, or appends it."""
  text = open(path).read() if os.path.exists(path) else ''
  pattern = re.compile(r'^## gradcache\n.*?(?=^## |\Z)', re.M | re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text, count=1)
  else:
    text = text.rstrip('\n') + ('\n\n' if text.strip() else '') + section
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')


def gradcache_bench(command):
  points = [peak_rss(int(n)) for n in FLAGS.rss_batch_sizes]
  timing = time_ratio()
  section = report(timing, points, command)
  print(section)
  if FLAGS.out:
    write_section(FLAGS.out, section)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m basic.bench gradcache [--out=F]')
  if argv[1] == 'gradcache':
    gradcache_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'gradcache_worker':
    worker()
  else:
    raise app.UsageError(f'Unknown benchmark {argv[1]!r}.')


if __name__ == '__main__':
  app.run(main)
