r"""Benchmarks; not part of the test suite.

Usage:

  python -m basic.bench gradcache [--out=BENCHMARKS.md]
  python -m basic.bench input [--out=BENCHMARKS.md]
  python -m basic.bench clipa [--out=BENCHMARKS.md]

`gradcache` measures
  (a) the time of a gradient-cached step (K microbatches) over the time of a
      plain full-batch step, at a batch where both fit;
  (b) the peak RSS of a fresh process running one gradient-cached step at two
      batch sizes with the same microbatch size and the loss chunk c * N held
      fixed, so that the growth of the peak can be accounted term by term.
It prints a markdown table; with --out it replaces (or appends) the section
`## gradcache` of that markdown file.

The step is basic.train's own train step on the towers of configs/tiny.py.

`input` measures the tf.data input pipeline (basic/data/pipeline.py) on JPEG TFRecord shards in
img2dataset's schema that it writes first (photo-like images: smooth shapes, gradients and
grain): decode + random resized crop + tokenise, in images/s with 1 tf.data thread (per CPU
core) and with all cores, from 512 x 384 JPEGs to 224 x 224 and to the tiny config's 32 x 32,
and from 64 x 64 JPEGs to 32 x 32; then the images/s the tiny config's train step consumes, on
the same machine. With --out it replaces (or appends) the section `## Input pipeline` of that
markdown file.

`clipa` measures CLIPA token reduction on the tiny config's towers (configs/tiny.py), in one run:
the image tower alone (ViT forward + backward, pairs/s) and the whole train step (pairs/s) at full
tokens (32 px: 16 patch tokens; 16 text tokens), at half the image side (16 px: 4 tokens), with
50% and 75% random patch masking, and with 8 text tokens. With --out it replaces (or appends) the
section `## CLIPA token reduction` of that markdown file.
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
import jax
import numpy as np

from basic import config_lib
from basic import optim
from basic import sharding
from basic import train
from basic.models import DualEncoder
from configs import tiny

FLAGS = flags.FLAGS
# `input`.
flags.DEFINE_integer('input_records', 512, 'JPEG records written per stored image size.')
flags.DEFINE_list('input_cases', ['512x384:224', '512x384:32', '64x64:32'],
                  'Measurements WIDTHxHEIGHT:SIZE: stored JPEG size, output size.')
flags.DEFINE_integer('input_jpeg_quality', 90, 'JPEG quality of the stored images.')
flags.DEFINE_integer('input_text_length', 64, 'Tokens per caption.')
flags.DEFINE_integer('input_batch_size', 64, 'Batch size of the measured pipeline.')
flags.DEFINE_float('input_seconds', 15.0, 'Timed seconds per measurement (after warm-up).')
flags.DEFINE_string('out', None, 'Markdown file whose `## gradcache` section '
                    'is replaced (or appended) with the results.')
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
flags.DEFINE_integer('batch_size', None, 'N of a single worker step.')
flags.DEFINE_integer('num_microbatches', None, 'K of a single worker step.')
flags.DEFINE_integer('chunk_size', None, 'c of a single worker step.')

# `clipa`.
flags.DEFINE_integer('clipa_batch_size', 256, 'Pairs per measured step.')
flags.DEFINE_integer('clipa_repeats', 10, 'Timed steps per case after compilation.')

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
  config_lib.validate(config)
  model = DualEncoder(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  state, _ = train.create_train_state(config, model, tx, sharding.make_mesh(config.mesh))
  np_rng = np.random.default_rng(0)
  size, length = config.data.image_size, config.data.text_length
  batch = {
      'image': np_rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
      'text': np_rng.integers(1, config.model.text.vocab_size, (batch_size, length),
                              dtype=np.int32),
  }
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  return step, state, batch, jax.random.key(0)


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


def _time_steps(step, state, batch, rng, repeats):
  """Compiles, then returns the median wall time of `repeats` steps."""
  jax.block_until_ready(step(state, batch, rng))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(state, batch, jax.random.fold_in(rng, i)))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_ratio():
  """(a): median seconds of the plain (K=1) and the cached (K) step, and their ratio."""
  n, k = FLAGS.time_batch_size, FLAGS.time_num_microbatches
  chunk = _chunk_size(n)
  step, state, batch, rng = make_step(n, n, chunk)
  batch = jax.device_put(batch)
  plain = _time_steps(step, state, batch, rng, FLAGS.repeats)
  rows = []
  for unroll in (k, 1):  # Fully unrolled (the CPU setting), then a rolled loop.
    step, state, _, rng = make_step(n, n // k, chunk, unroll)
    cached = _time_steps(step, state, batch, rng, FLAGS.repeats)
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


# --- input ----------------------------------------------------------------------------------------


def _photo_like_images(n, height, width, seed=0):
  """(uint8 [height, width, 3], caption) pairs with the statistics of photos rather than of
  noise: the synthetic shapes upscaled (smooth regions, sharp edges), a colour gradient and
  fine grain."""
  from basic.data import synthetic  # pylint: disable=g-import-not-at-top
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  shapes = synthetic.ShapesDataset(seed, 64, 0)
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  for start in range(0, n, 64):
    examples = shapes.train_examples(np.arange(start, min(start + 64, n)))
    big = tf.image.resize(examples['image'], [height, width], method='bicubic').numpy()
    for image, caption in zip(big, examples['caption']):
      angle, tint = rng.uniform(0, 2 * np.pi), rng.uniform(-60, 60, 3)
      ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None] * tint
      grain = rng.normal(0, 6, (height, width, 3))
      yield np.clip(image + ramp + grain, 0, 255).astype(np.uint8), caption


def _write_input_shards(directory, height, width, num_shards=4):
  """Writes FLAGS.input_records JPEG records; returns (pattern, mean JPEG bytes, captions)."""
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  from basic.data import write_tfrecords  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  os.makedirs(directory)
  n = FLAGS.input_records
  writers = [tf.io.TFRecordWriter(os.path.join(directory, f'{s:05d}.tfrecord'))
             for s in range(num_shards)]
  total, captions = 0, []
  for i, (image, caption) in enumerate(_photo_like_images(n, height, width)):
    jpeg = tf.io.encode_jpeg(image, quality=FLAGS.input_jpeg_quality).numpy()
    total += len(jpeg)
    captions.append(caption)
    writers[i % num_shards].write(write_tfrecords.make_example(
        f'{i:09d}', jpeg, caption, width, height).SerializeToString())
  for w in writers:
    w.close()
  return os.path.join(directory, '*.tfrecord'), total / n, captions


def _input_rate(config, tokenizer, threads):
  """Images/s of make_train_iterator with `threads` tf.data threads (after a warm-up)."""
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  config.data.threads = threads
  batches = pipeline.make_train_iterator(config, tokenizer)
  for _ in range(3):
    next(batches)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < FLAGS.input_seconds:
    count += next(batches)['image'].shape[0]
  return count / (time.perf_counter() - start)


def _tiny_step_rate(repeats=20):
  """Images/s the train step of configs/tiny.py consumes (batch 256, median step time)."""
  config = tiny.get_config()
  step, state, batch, rng = make_step(config.batch_size, config.microbatch_size,
                                      config.loss_chunk_size, config.gradcache_unroll)
  seconds = _time_steps(step, state, jax.device_put(batch), rng, repeats)
  return config.batch_size / seconds


def _input_cases():
  """[(source width, source height, output size)] from --input_cases ('WxH:S,...')."""
  cases = []
  for case in FLAGS.input_cases:
    source, _, size = case.partition(':')
    width, _, height = source.partition('x')
    cases.append((int(width), int(height), int(size)))
  return cases


def input_bench(command):
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count()
  rows, shards = [], {}
  with tempfile.TemporaryDirectory() as directory:
    for width, height, size in _input_cases():
      if (width, height) not in shards:
        shards[(width, height)] = _write_input_shards(
            os.path.join(directory, f'{width}x{height}'), height, width)
      pattern, jpeg_bytes, captions = shards[(width, height)]
      model = os.path.join(directory, 'spm.model')
      if not os.path.exists(model):
        tokenizer_lib.train(captions * 4, 256, model)
      config = tiny.get_config()
      config.batch_size = config.microbatch_size = FLAGS.input_batch_size
      config.data.update(dict(source='tfrecord', tfrecord_pattern=pattern, image_size=size,
                              text_length=FLAGS.input_text_length))
      config_lib.validate(config)
      tokenizer = tokenizer_lib.Tokenizer.from_config(config.tokenizer, model,
                                                      config.data.text_length)
      one = _input_rate(config, tokenizer, 1)
      every = _input_rate(config, tokenizer, cores)
      rows.append((width, height, jpeg_bytes, size, one, every))
      print(f'{width}x{height} -> {size} px: {one:.0f} images/s with 1 thread, {every:.0f} '
            f'with {cores}.', flush=True)
  tiny_rate = _tiny_step_rate()
  print(f'tiny train step: {tiny_rate:.0f} images/s.')
  lines = [
      '## Input pipeline', '',
      f'Command: `{command}`', '',
      f'Machine: {cores} CPU cores, {jax.devices()[0].device_kind}; shared with other jobs '
      f'while it ran (load average {os.getloadavg()[0]:.1f} at the end), so every rate is a '
      'lower bound and the two columns compete with the same neighbours.', '',
      f'Data: {FLAGS.input_records} JPEG records per source size (quality '
      f'{FLAGS.input_jpeg_quality}; photo-like: upscaled synthetic shapes, a colour gradient '
      "and grain) in 4 TFRecord shards in img2dataset's schema, read through "
      "`pipeline.make_train_iterator` with `configs/tiny.py`'s data defaults: parse, decode "
      '(the crop window only, or at 1/2-1/8 scale when the window is that much larger than the '
      'output) + random resized crop (scale '
      f'{tuple(tiny.get_config().data.augment.crop_scale)}) + bilinear antialiased resize + '
      f'tokenise ({FLAGS.input_text_length} tokens) + batch {FLAGS.input_batch_size}; '
      f'{FLAGS.input_seconds:.0f} s timed after 3 batches.', '',
      '| stored JPEG | mean size | output | images/s, 1 tf.data thread (per core) | '
      f'images/s, {cores} threads (all cores) |',
      '|---|---|---|---|---|',
      *[f'| {w} x {h} | {b / 1024:.1f} KiB | {s} x {s} | {one:.0f} | {every:.0f} |'
        for w, h, b, s, one, every in rows], '',
      f"The tiny config's train step (batch 256, 32 px, both cores) consumes {tiny_rate:.0f} "
      'images/s measured right after, on the same machine (median of 20 steps).',
  ]
  section = '\n'.join(lines) + '\n'
  print(section)
  if FLAGS.out:
    _write_named_section(FLAGS.out, '## Input pipeline', section)


def _write_named_section(path, title, section):
  """Replaces the section `title` of a markdown file, or appends it."""
  text = open(path).read() if os.path.exists(path) else ''
  pattern = re.compile('^' + re.escape(title) + r'\n.*?(?=^## |\Z)', re.M | re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text, count=1)
  else:
    text = text.rstrip('\n') + ('\n\n' if text.strip() else '') + section
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')


# --- clipa: token reduction throughput. ---------------------------------------------------------

CLIPA_CASES = (  # name, image size, image mask (kind, ratio), text length.
    ('full tokens (32 px, 16 text)', 32, ('none', 0.0), 16),
    ('half image side (16 px: 4x fewer image tokens)', 16, ('none', 0.0), 16),
    ('random masking 50%', 32, ('random', 0.5), 16),
    ('random masking 75%', 32, ('random', 0.75), 16),
    ('text 8 tokens', 32, ('none', 0.0), 8),
)


def _clipa_config(size, mask, length, batch_size):
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.image_size, config.data.text_length = size, length
  config.model.image.mask.kind, config.model.image.mask.ratio = mask
  config_lib.validate(config)
  return config


def _image_tower_rate(config, repeats):
  """Pairs/s of the ViT image tower alone: forward + backward of its pooled features."""
  from basic.models import vit  # pylint: disable=g-import-not-at-top
  c = config.model.image
  model = vit.ViT(patch_size=c.patch_size, width=c.width, depth=c.depth, num_heads=c.num_heads,
                  mlp_dim=c.mlp_dim, pool=c.pool, mask=c.mask.kind, mask_ratio=c.mask.ratio)
  n, size = config.batch_size, config.data.image_size
  images = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), images[:1])['params']

  @jax.jit
  def step(p, x, rng):
    loss = lambda q: model.apply({'params': q}, x, train=True, rngs={'dropout': rng}).sum()
    return jax.grad(loss)(p)

  seconds = _time_steps(lambda s, b, r: step(s, b, r), params, images, jax.random.key(1),
                        repeats)
  return n / seconds


def _mask_is_wired(config, model, state, batch):
  """Whether the DualEncoder's image tower applies config.model.image.mask in training."""
  _, out = model.apply({'params': state.params}, batch['image'][:2], batch['text'][:2],
                       train=True, rngs={'dropout': jax.random.key(0)},
                       mutable=['intermediates'])
  return 'kept' in out.get('intermediates', {}).get('image', {})


def _train_step_rate(config, repeats):
  """Pairs/s of basic.train's whole train step, and whether the image mask was applied."""
  model = DualEncoder(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  state, _ = train.create_train_state(config, model, tx, sharding.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  n, size, length = config.batch_size, config.data.image_size, config.data.text_length
  batch = {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
           'text': rng.integers(1, config.model.text.vocab_size, (n, length), dtype=np.int32)}
  wired = _mask_is_wired(config, model, state, batch)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  return n / _time_steps(step, state, batch, jax.random.key(0), repeats), wired


def clipa_bench(command):
  n, repeats = FLAGS.clipa_batch_size, FLAGS.clipa_repeats
  rows = []
  for name, size, mask, length in CLIPA_CASES:
    config = _clipa_config(size, mask, length, n)
    image_rate = _image_tower_rate(config, repeats) if length == 16 else None
    step_rate, wired = _train_step_rate(config, repeats)
    rows.append((name, image_rate, step_rate, wired or mask[0] == 'none'))
    print(rows[-1], flush=True)
  base_image, base_step = rows[0][1], rows[0][2]
  lines = ['## CLIPA token reduction', '',
           f'`{command}` on {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores), '
           f'configs/tiny.py towers, batch {n}, median of {repeats} steps after compilation. '
           'Image tower: ViT forward + backward alone; train step: basic.train\'s whole step '
           '(both towers, loss, AdamW).', '',
           '| case | image tower pairs/s | x full | train step pairs/s | x full |',
           '| --- | ---: | ---: | ---: | ---: |']
  for name, image_rate, step_rate, applied in rows:
    image = (f'{image_rate:,.0f} | {image_rate / base_image:.2f}' if image_rate else '- | -')
    note = '' if applied else ' (mask not applied by the DualEncoder: not wired yet)'
    lines.append(f'| {name}{note} | {image} | {step_rate:,.0f} | {step_rate / base_step:.2f} |')
  section = '\n'.join(lines) + '\n'
  print(section)
  if FLAGS.out:
    _write_named_section(FLAGS.out, '## CLIPA token reduction', section)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m basic.bench gradcache|input|clipa [--out=F]')
  if argv[1] == 'gradcache':
    gradcache_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'input':
    input_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'clipa':
    clipa_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'gradcache_worker':
    worker()
  else:
    raise app.UsageError(f'Unknown benchmark {argv[1]!r}.')


if __name__ == '__main__':
  app.run(main)
