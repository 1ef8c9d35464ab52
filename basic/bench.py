r"""Benchmarks; not part of the test suite.

Usage:

  python -m basic.bench gradcache [--out=BENCHMARKS.md]
  python -m basic.bench input [--out=BENCHMARKS.md]
  python -m basic.bench clipa [--out=BENCHMARKS.md]
  python -m basic.bench clipa_schedule [--clipa_budget_s=240] [--out=BENCHMARKS.md]

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
50% and 75% random patch masking, with 8 text tokens, and with both reductions (16 px or 75%
masking, and 8 text tokens): all compiled first, then timed in --clipa_rounds interleaved rounds
of --clipa_repeats steps, each figure the fastest step of its case. With --out it replaces (or
appends) the section `## CLIPA token reduction` of that markdown file.

`clipa_schedule` compares, on the embedded default (configs/tiny.py: synthetic shapes, zero-shot
top-1 on the 10 held-out colour x shape classes among all 48) and at the same training wall-clock
budget (--clipa_budget_s, compile excluded), the CLIPA schedule (pre-training on reduced tokens,
then a short full-token fine-tune from its checkpoint through `init_from`, with its own warmup
and cosine schedule) against the full-token schedule (the tiny run, shortened to the budget). It
first times a step of each configuration through basic.train itself and picks the CLIPA run's
steps from those times; the full-token run's steps then come from the CLIPA run's measured
training time (the load of a shared machine moves between runs). Every run goes through
`basic.train.train_and_evaluate` (workdirs in a temporary directory), scored by the final
held-out zero-shot top-1 of its evaluator. With --out it replaces (or appends) the section
`## CLIPA schedule vs full tokens at equal time`.
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
flags.DEFINE_integer('clipa_repeats', 10, 'Timed steps per case per round.')
flags.DEFINE_integer('clipa_rounds', 3, 'Interleaved timing rounds over all cases.')
# `clipa_schedule`.
flags.DEFINE_float('clipa_budget_s', 240.0,
                   'Training seconds (compile excluded) of each schedule: the full-token run, '
                   'and pre-training + fine-tune of the CLIPA run.')
flags.DEFINE_float('clipa_pretrain_share', 0.8,
                   'Share of the budget spent on reduced-token pre-training; the fine-tune '
                   'gets the rest.')
# CHOICE from a pilot scored on the 38 seen classes (never the held-out ones): seed 2, 800 steps
# of pre-training, 100 of fine-tune; seen top-1 0.81 / 0.85 / 0.88 at ratios 0.25 / 0.5 / 1.0.
flags.DEFINE_float('clipa_tune_lr_ratio', 1.0,
                   'Peak learning rate of the full-token fine-tune over the pre-training one.')
flags.DEFINE_float('clipa_tune_warmup_share', 0.1, 'Warmup steps of the fine-tune / its steps.')
flags.DEFINE_integer('clipa_calibration_steps', 40,
                     'Steps of each configuration timed to pick the step counts (the first '
                     'window of 10, with the compile, is left out).')
flags.DEFINE_list('clipa_seeds', ['0', '1'],
                  'config.seed and data.synthetic.seed of each repetition (the synthetic seed '
                  'also draws the held-out evaluation images; both schedules of a seed share '
                  'them).')

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
      tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, model, config.data.text_length)
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
    ('16 px + text 8 tokens', 16, ('none', 0.0), 8),
    ('random masking 75% + text 8 tokens', 32, ('random', 0.75), 8),
)


def _clipa_config(size, mask, length, batch_size):
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.image_size, config.data.text_length = size, length
  config.model.image.mask.kind, config.model.image.mask.ratio = mask
  config_lib.validate(config)
  return config


def _step_timer(step, args, rng):
  """Compiles `step(*args, rng)`; -> timer(i): the wall seconds of one more step."""
  jax.block_until_ready(step(*args, rng))

  def timer(i):
    start = time.perf_counter()
    jax.block_until_ready(step(*args, jax.random.fold_in(rng, i)))
    return time.perf_counter() - start
  return timer


def _image_tower_timer(config):
  """Timer of the ViT image tower alone: forward + backward of its pooled features."""
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

  return _step_timer(step, (params, images), jax.random.key(1))


def _mask_is_wired(config, model, state, batch):
  """Whether the DualEncoder's image tower applies config.model.image.mask in training."""
  _, out = model.apply({'params': state.params}, batch['image'][:2], batch['text'][:2],
                       train=True, rngs={'dropout': jax.random.key(0)},
                       mutable=['intermediates'])
  return 'kept' in out.get('intermediates', {}).get('image', {})


def _train_step_timer(config):
  """Timer of basic.train's whole train step, and whether the image mask was applied."""
  model = DualEncoder(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  state, _ = train.create_train_state(config, model, tx, sharding.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  n, size, length = config.batch_size, config.data.image_size, config.data.text_length
  batch = {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
           'text': rng.integers(1, config.model.text.vocab_size, (n, length), dtype=np.int32)}
  wired = _mask_is_wired(config, model, state, batch)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  return _step_timer(step, (state, batch), jax.random.key(0)), wired


def _niceness():
  """', under `nice -n N`' when this process runs at a lower priority, else ''."""
  n = os.nice(0)
  return f', under `nice -n {n}`' if n else ''


def _load_average():
  """'1-min / 5-min / 15-min' load average of the machine, e.g. '1.6 / 1.9 / 1.8'."""
  return ' / '.join(f'{x:.1f}' for x in os.getloadavg())


def clipa_bench(command):
  n, repeats, rounds = FLAGS.clipa_batch_size, FLAGS.clipa_repeats, FLAGS.clipa_rounds
  load_before = _load_average()
  timers = []   # Every case compiled first: (name, image timer or None, step timer, applied).
  for name, size, mask, length in CLIPA_CASES:
    config = _clipa_config(size, mask, length, n)
    image = _image_tower_timer(config) if length == 16 else None
    step, wired = _train_step_timer(config)
    timers.append((name, image, step, wired or mask[0] == 'none'))
  # Then timed in interleaved rounds, so that a burst of load from other jobs hits every case
  # alike; per case the fastest step of all rounds, and for the baseline each round's fastest.
  best = {}
  baseline_rounds = []
  for r in range(rounds):
    for name, image, step, _ in timers:
      for kind, timer in (('image', image), ('step', step)):
        if timer is not None:
          fastest = min(timer(r * repeats + i) for i in range(repeats))
          best[name, kind] = min(best.get((name, kind), fastest), fastest)
          if name == CLIPA_CASES[0][0] and kind == 'step':
            baseline_rounds.append(n / fastest)
    print(f'round {r + 1} of {rounds} done; load average {_load_average()}', flush=True)
  rows = [(name, n / best[name, 'image'] if image else None, n / best[name, 'step'], applied)
          for name, image, _, applied in timers]
  for row in rows:
    print(row)
  section = clipa_section(command, rows, baseline_rounds, load_before, _load_average())
  print(section)
  if FLAGS.out:
    _write_named_section(FLAGS.out, '## CLIPA token reduction', section)


def clipa_section(command, rows, baseline_rounds, load_before, load_after):
  """The markdown section of `clipa_bench`'s rows (name, image pairs/s, step pairs/s, applied);
  the first row is the baseline of the ratios; baseline_rounds: its train step pairs/s per
  round."""
  n, repeats, rounds = FLAGS.clipa_batch_size, FLAGS.clipa_repeats, FLAGS.clipa_rounds
  base_image, base_step = rows[0][1], rows[0][2]
  gain = {name: (image_rate / base_image if image_rate else None, step_rate / base_step)
          for name, image_rate, step_rate, _ in rows}
  half, mask75, text8, both = (gain[CLIPA_CASES[i][0]] for i in (1, 3, 4, 5))
  lines = ['## CLIPA token reduction', '',
           f'`{command}`{_niceness()} on {jax.devices()[0].platform.upper()} '
           f'({os.cpu_count()} cores), '
           f'configs/tiny.py towers, batch {n}. Every case is compiled first, then timed in '
           f'{rounds} interleaved rounds of {repeats} steps (so a burst of load from other jobs '
           'hits all cases alike); each figure is the fastest step of its case (other jobs only '
           'ever slow a step down, so the fastest is the closest to this machine\'s own speed). '
           'Image tower: ViT forward + backward alone (basic/models/vit.py with '
           '`mask`/`mask_ratio`); train step: basic.train\'s whole step (both towers, loss, '
           'AdamW; the DualEncoder applies `config.model.image.mask`, checked per row).', '',
           f'Machine load (1 / 5 / 15-min load average, 2 cores): {load_before} before, '
           f'{load_after} after; the machine is shared (CI runs and other jobs), so absolute '
           'rates are lower bounds and the ratios move with the load too: the full-token train '
           'step\'s fastest step per round gave '
           + ', '.join(f'{x:,.0f}' for x in baseline_rounds) + ' pairs/s.', '',
           '| case | image tower pairs/s | x full | train step pairs/s | x full |',
           '| --- | ---: | ---: | ---: | ---: |']
  for name, image_rate, step_rate, applied in rows:
    image = (f'{image_rate:,.0f} | {image_rate / base_image:.2f}' if image_rate else '- | -')
    note = '' if applied else ' (mask not applied by the DualEncoder: not wired yet)'
    lines.append(f'| {name}{note} | {image} | {step_rate:,.0f} | {step_rate / base_step:.2f} |')
  lines += [
      '',
      f'- Image tower (target >= 3x): 4x fewer image tokens give {half[0]:.1f}x its throughput '
      f'at half the side and {mask75[0]:.1f}x with 75% random masking (there the patch embedding '
      'still runs on all 16 patches, and the gather adds a step).',
      f'- Whole train step: {half[1]:.2f}x at 16 px, {mask75[1]:.2f}x with 75% masking, '
      f'{text8[1]:.2f}x with 8 text tokens, {both[1]:.2f}x with 16 px and 8 text tokens (the '
      'pre-training tokens of `clipa_schedule` below): the text tower, the loss and the AdamW '
      'update do not shrink with the image tokens.',
  ]
  return '\n'.join(lines) + '\n'


# --- clipa_schedule: CLIPA schedule vs full tokens at the same training wall-clock budget. -------

# The reduced tokens of the CLIPA pre-training (CHOICE): image side halved (16 px: 4 of the 16
# patch tokens; CLIPA's best image reduction is resizing, and random masking would often hide the
# one shape an image shows) and 8 text tokens with syntax masking (content words kept first).
CLIPA_PRETRAIN_TOKENS = dict(image_size=16, text_length=8, text_mask='syntax')


def allocate_steps(budget_s, full_step_s, reduced_step_s, pretrain_share):
  """Step counts that give both schedules `budget_s` seconds of training (the plan).

  Args:
    budget_s: training seconds of each schedule.
    full_step_s: seconds per full-token step (the full-token run and the fine-tune).
    reduced_step_s: seconds per reduced-token step (the pre-training).
    pretrain_share: fraction of the CLIPA schedule's budget spent pre-training.

  Returns:
    dict(full=, pretrain=, tune=) steps (each >= 1): full * full_step_s, and
    pretrain * reduced_step_s + tune * full_step_s, both about budget_s (within a step).
  """
  steps = lambda seconds, step_s: max(1, round(seconds / step_s))
  return dict(full=steps(budget_s, full_step_s),
              pretrain=steps(pretrain_share * budget_s, reduced_step_s),
              tune=steps((1 - pretrain_share) * budget_s, full_step_s))


def _schedule_config(seed, steps, *, reduced, tokenizer_path='', learning_rate=None,
                     warmup_steps=None, init_from='', zeroshot=True):
  """configs/tiny.py for one run of `steps` steps, reduced or full tokens, evaluated at the end."""
  config = tiny.get_config()
  base_warmup, base_steps = config.optimizer.warmup_steps, config.total_steps
  config.seed = config.data.synthetic.seed = seed
  config.total_steps = steps
  # Wall times per window of 10 steps in metrics.jsonl (the compile is in the first window);
  # short windows, but not every step, which would synchronise the host with every step.
  config.log_every_steps = min(10, steps)
  config.eval_every_steps = config.checkpoint_every_steps = steps   # At the end only.
  config.keep_checkpoints = 1
  # The tiny config's warmup share of the steps unless given.
  config.optimizer.warmup_steps = (warmup_steps if warmup_steps is not None else
                                   round(steps * base_warmup / base_steps))
  if learning_rate is not None:
    config.optimizer.learning_rate = learning_rate
  config.tokenizer.model_path = tokenizer_path
  config.init_from = init_from
  config.eval.zeroshot = zeroshot
  if reduced:
    config.data.image_size = CLIPA_PRETRAIN_TOKENS['image_size']
    config.data.text_length = CLIPA_PRETRAIN_TOKENS['text_length']
    config.data.text_mask.kind = CLIPA_PRETRAIN_TOKENS['text_mask']
    config.data.text_mask.length = 0   # Words kept = data.text_length.
  return config_lib.validate(config)


def _run(config, workdir):
  """Trains `config` in `workdir` through basic.train; -> timings, final evaluation and load.

  Times come from metrics.jsonl: a row per window of log_every_steps steps, whose
  `train/images_per_sec` gives the window's wall time. The first window holds the compile; the
  training time counts the later windows as measured and the first at their median step time.
  """
  from basic import metric_writers  # pylint: disable=g-import-not-at-top
  load = os.getloadavg()[0]
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  if config.eval.zeroshot and 'zeroshot/top1' not in results:   # SIGTERM: stopped early.
    raise RuntimeError(f'{workdir}: training stopped before its last step.')
  rows = metric_writers.read_jsonl(os.path.join(workdir, metric_writers.METRICS_FILE))
  rows = sorted((r for r in rows if 'train/images_per_sec' in r), key=lambda r: r['step'])
  ends = [r['step'] for r in rows]
  steps = [e - s for e, s in zip(ends, [0] + ends[:-1])]                   # [windows]
  seconds = [k * config.batch_size / r['train/images_per_sec'] for k, r in zip(steps, rows)]
  later = list(zip(steps[1:], seconds[1:])) or [(steps[0], seconds[0])]   # One window: as is.
  median = statistics.median(t / k for k, t in later)
  train_s = sum(t for _, t in later) + (median * steps[0] if len(rows) > 1 else 0.0)
  return dict(steps=config.total_steps, train_s=train_s, first_s=seconds[0],
              median_step_s=median, wall_s=wall, top1=results.get('zeroshot/top1'),
              load=(load + os.getloadavg()[0]) / 2)


def _calibrate(directory, seed, reduced, tokenizer_path):
  """Median seconds per step of basic.train's loop (input pipeline included, compile excluded)."""
  config = _schedule_config(seed, FLAGS.clipa_calibration_steps, reduced=reduced,
                            tokenizer_path=tokenizer_path, zeroshot=False)
  name = 'calibrate_reduced' if reduced else 'calibrate_full'
  return _run(config, os.path.join(directory, name))['median_step_s']


def _clipa_schedule_seed(directory, seed, plan):
  """The CLIPA run (pre-train, then fine-tune), then the full-token run, of one seed.

  The CLIPA run takes the planned steps (`allocate_steps` at the calibrated step times). The
  machine's load moves between runs, so the full-token run's steps come from measured times:
  the CLIPA run's measured training time at the fine-tune's median step time (the same step as
  the full-token run's, measured just before it); only this last prediction can be off.
  """
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = os.path.join(directory, f'seed{seed}')
  tokenizer_path = tokenizer_lib.ensure_tokenizer(
      _schedule_config(seed, 1, reduced=False), directory)   # One tokenizer for all its runs.
  pretrain_dir = os.path.join(directory, 'pretrain')
  pretrain = _run(_schedule_config(seed, plan['pretrain'], reduced=True,
                                   tokenizer_path=tokenizer_path), pretrain_dir)
  print(f'seed {seed} CLIPA pre-training: {pretrain}', flush=True)
  tune_lr = FLAGS.clipa_tune_lr_ratio * tiny.get_config().optimizer.learning_rate
  tune = _run(_schedule_config(
      seed, plan['tune'], reduced=False, tokenizer_path=tokenizer_path,
      learning_rate=tune_lr, warmup_steps=round(FLAGS.clipa_tune_warmup_share * plan['tune']),
      init_from=pretrain_dir), os.path.join(directory, 'tune'))
  print(f'seed {seed} CLIPA fine-tune: {tune}', flush=True)
  full_steps = max(1, round((pretrain['train_s'] + tune['train_s']) / tune['median_step_s']))
  full = _run(_schedule_config(seed, full_steps, reduced=False, tokenizer_path=tokenizer_path),
              os.path.join(directory, 'full'))
  print(f'seed {seed} full tokens: {full}', flush=True)
  return dict(seed=seed, full=full, pretrain=pretrain, tune=tune)


def clipa_schedule_bench(command):
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  budget, share = FLAGS.clipa_budget_s, FLAGS.clipa_pretrain_share
  seeds = [int(s) for s in FLAGS.clipa_seeds]
  load_before, start = _load_average(), time.perf_counter()
  with tempfile.TemporaryDirectory() as directory:
    tokenizer_path = tokenizer_lib.ensure_tokenizer(
        _schedule_config(seeds[0], 1, reduced=False), os.path.join(directory, 'calibrate'))
    full_step_s = _calibrate(directory, seeds[0], False, tokenizer_path)
    reduced_step_s = _calibrate(directory, seeds[0], True, tokenizer_path)
    steps = allocate_steps(budget, full_step_s, reduced_step_s, share)
    print(f'calibrated: {full_step_s:.3f} s per full-token step, {reduced_step_s:.3f} s per '
          f'reduced-token step -> steps {steps}', flush=True)
    runs = [_clipa_schedule_seed(directory, seed, steps) for seed in seeds]
  total_min, load_after = (time.perf_counter() - start) / 60, _load_average()
  config = tiny.get_config()
  tokens = CLIPA_PRETRAIN_TOKENS
  lines = [
      '## CLIPA schedule vs full tokens at equal time', '',
      f'Command: `{command}` ({total_min:.0f} min in all{_niceness()}).', '',
      f'Machine: {jax.devices()[0].platform.upper()}, {os.cpu_count()} cores, shared (CI runs '
      f'and other jobs); load average (1 / 5 / 15 min) {load_before} before, {load_after} '
      'after; the 1-min load average of each run (mean of its start and end) is in the table.',
      '',
      'Both schedules train configs/tiny.py\'s model (0.43M parameters, batch '
      f'{config.batch_size}) through `basic.train.train_and_evaluate` and are scored by its '
      f'evaluator: zero-shot top-1 on the {config.data.synthetic.num_heldout} held-out colour x '
      'shape classes (never in training) among all 48, '
      f'{config.data.synthetic.eval_per_class} images each, at 32 px and 16 text tokens.', '',
      f'- Full tokens: {config.data.image_size} px (16 patch tokens), '
      f'{config.data.text_length} text tokens; lr {config.optimizer.learning_rate:g}, warmup '
      f'the tiny config\'s share ({config.optimizer.warmup_steps} / {config.total_steps} of the '
      'steps), cosine to 0.',
      f'- CLIPA: pre-training on reduced tokens, {tokens["image_size"]} px '
      f'({(tokens["image_size"] // config.model.image.patch_size) ** 2} patch tokens) and '
      f'{tokens["text_length"]} text tokens ({tokens["text_mask"]} text masking), same lr and '
      f'warmup share, for {share:.0%} of the budget (CHOICE); then a full-token fine-tune from '
      'its checkpoint (`init_from`; the learned position embeddings interpolated 2x2 -> 4x4 and '
      f'8 -> 16) for the rest, with its own warmup '
      f'({FLAGS.clipa_tune_warmup_share:.0%} of its steps) and cosine to 0 from lr '
      f'{FLAGS.clipa_tune_lr_ratio:g} x the pre-training one (CHOICE, from a pilot scored on '
      'the seen classes only, never on the held-out ones: 0.25 / 0.5 / 1.0 gave seen top-1 '
      '0.81 / 0.85 / 0.88; comment of the flag in basic/bench.py).',
      f'- Step counts: the CLIPA run gets {steps["pretrain"]} + {steps["tune"]} steps, '
      f'{budget:.0f} s (--clipa_budget_s) at the step times measured first in the same process '
      f'({FLAGS.clipa_calibration_steps} steps of each configuration through '
      '`train_and_evaluate`, input pipeline included, the first 10 with the compile left out): '
      f'{full_step_s:.3f} s per full-token step, {reduced_step_s:.3f} s per reduced-token step '
      f'({full_step_s / reduced_step_s:.2f}x faster). The load of this machine moves between '
      "runs, so the full-token run's budget is the CLIPA run's *measured* training time, and "
      "its steps come from the fine-tune's median step (the same full-token step, measured "
      'just before): the two measured training times differ only by the error of that one '
      'prediction (the CLIPA total row gives the ratio).',
      '- Training time: the sum of the wall times of the windows of 10 steps that '
      '`train_and_evaluate` logs (`train/images_per_sec`), the first window (it holds the '
      'compile) counted at the median step time of the others. Wall: the whole '
      '`train_and_evaluate` call (setup, compile, checkpoint and evaluation included). The seeds '
      'set `config.seed` and `data.synthetic.seed` (training stream and evaluation images).',
      '',
      '| seed | schedule | steps | training time (s) | median step (s) | wall (s) | load | '
      'held-out top-1 |',
      '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for run in runs:
    seed, full, pre, tune = run['seed'], run['full'], run['pretrain'], run['tune']
    lines += [
        f'| {seed} | full tokens | {full["steps"]} | {full["train_s"]:.0f} | '
        f'{full["median_step_s"]:.3f} | {full["wall_s"]:.0f} | {full["load"]:.1f} | '
        f'**{full["top1"]:.3f}** |',
        f'| {seed} | CLIPA pre-training ({tokens["image_size"]} px, {tokens["text_length"]} '
        f'tokens) | {pre["steps"]} | {pre["train_s"]:.0f} | {pre["median_step_s"]:.3f} | '
        f'{pre["wall_s"]:.0f} | {pre["load"]:.1f} | ({pre["top1"]:.3f} at 16 px) |',
        f'| {seed} | CLIPA fine-tune (32 px, 16 tokens) | {tune["steps"]} | '
        f'{tune["train_s"]:.0f} | {tune["median_step_s"]:.3f} | {tune["wall_s"]:.0f} | '
        f'{tune["load"]:.1f} | |',
        f'| {seed} | CLIPA total | {pre["steps"] + tune["steps"]} | '
        f'{pre["train_s"] + tune["train_s"]:.0f} '
        f'({(pre["train_s"] + tune["train_s"]) / full["train_s"]:.2f}x full) | | '
        f'{pre["wall_s"] + tune["wall_s"]:.0f} | | **{tune["top1"]:.3f}** |',
    ]
  full_top1 = [r['full']['top1'] for r in runs]
  clipa_top1 = [r['tune']['top1'] for r in runs]
  mean = lambda x: sum(x) / len(x)
  winner = ('CLIPA' if mean(clipa_top1) > mean(full_top1) else
            'full tokens' if mean(clipa_top1) < mean(full_top1) else 'neither (a tie)')
  per_seed = '; '.join(
      f"seed {r['seed']}: {r['tune']['top1'] - r['full']['top1']:+.3f} top-1 in "
      f"{(r['pretrain']['train_s'] + r['tune']['train_s']) / r['full']['train_s']:.2f}x the "
      'training time' for r in runs)
  lines += ['', f'Mean held-out top-1 over {len(runs)} seed(s): full tokens '
            f'{mean(full_top1):.3f}, CLIPA {mean(clipa_top1):.3f}: **{winner}** wins at this '
            f'budget. CLIPA against full tokens, {per_seed}.']
  section = '\n'.join(lines) + '\n'
  print(section)
  if FLAGS.out:
    _write_named_section(FLAGS.out, '## CLIPA schedule vs full tokens at equal time', section)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(
        'Usage: python -m basic.bench gradcache|input|clipa|clipa_schedule [--out=F]')
  if argv[1] == 'gradcache':
    gradcache_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'input':
    input_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'clipa':
    clipa_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'clipa_schedule':
    clipa_schedule_bench('python -m basic.bench ' + ' '.join(sys.argv[1:]))
  elif argv[1] == 'gradcache_worker':
    worker()
  else:
    raise app.UsageError(f'Unknown benchmark {argv[1]!r}.')


if __name__ == '__main__':
  app.run(main)
