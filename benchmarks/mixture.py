r"""A weighted mixture of two sources vs one source; not part of the test suite.

  python -m benchmarks.mixture [--mixture_rounds=2] [--out=BENCHMARKS.md]

Writes two sets of photo-like JPEG TFRecord shards (benchmarks/input_pipeline.py's images; set b
drawn from another seed) and measures, in --mixture_rounds rounds alternating the two, the
training pipeline (`pipeline.make_train_iterator`, 1 tf.data thread) reading set a alone
('tfrecord') and reading a 0.7 / 0.3 mixture of a and b ('mixture', basic/data/mixture.py), in
images/s and images per CPU second, for each --input_cases case. Then the fractions of the
components over the first 10,000 examples of the mixture (from its cursors), and over 1,000,000
slots of the composition rule alone at batch 4096. With --out it replaces (or appends) the
section `## Data mixtures`.
"""
import os
import statistics
import time

from absl import flags
import jax
import ml_collections
import numpy as np

from basic import config_defaults
from basic import config_lib
from benchmarks import common
from benchmarks import input_pipeline
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_integer('mixture_rounds', 2, 'Rounds alternating single source and mixture.')

MODULE = 'benchmarks.mixture'
WEIGHTS = {'a': 0.7, 'b': 0.3}


def _config(kind, patterns, size):
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = FLAGS.input_batch_size
  config.data.image_size, config.data.text_length = size, FLAGS.input_text_length
  if kind == 'tfrecord':
    config.data.update(dict(source='tfrecord', tfrecord_pattern=patterns['a']))
  else:
    config.data.source = 'mixture'
    for name, weight in WEIGHTS.items():
      config.data.mixture[name] = ml_collections.ConfigDict(dict(
          source='tfrecord', weight=weight, tfrecord_pattern=patterns[name]))
  config = config_defaults.fill(config)
  config_lib.validate(config)
  return config


def _rates(config, tokenizer):
  """(images/s, images per CPU second) of make_train_iterator with 1 tf.data thread, after 3
  batches; CPU: user + system time of this process in the same window (the work, not the wait
  for a core)."""
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  config.data.threads = 1
  batches = pipeline.make_train_iterator(config, tokenizer)
  for _ in range(3):
    next(batches)
  cpu = lambda: sum(os.times()[:2])
  count, start, cpu_start = 0, time.perf_counter(), cpu()
  while time.perf_counter() - start < FLAGS.input_seconds:
    count += next(batches)['image'].shape[0]
  return count / (time.perf_counter() - start), count / (cpu() - cpu_start)


def _write_set(directory, height, width, seed):
  """FLAGS.input_records JPEG records of `seed` in 4 shards; -> (pattern, captions)."""
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  from basic.data import write_tfrecords  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  os.makedirs(directory)
  writers = [tf.io.TFRecordWriter(os.path.join(directory, f'{s:05d}.tfrecord'))
             for s in range(4)]
  captions = []
  images = input_pipeline.photo_like_images(FLAGS.input_records, height, width, seed=seed)
  for i, (image, caption) in enumerate(images):
    jpeg = tf.io.encode_jpeg(image, quality=FLAGS.input_jpeg_quality).numpy()
    captions.append(caption)
    writers[i % 4].write(write_tfrecords.make_example(
        f'{seed}{i:08d}', jpeg, caption, width, height).SerializeToString())
  for w in writers:
    w.close()
  return os.path.join(directory, '*.tfrecord'), captions


def _fractions(config, tokenizer, examples=10_000):
  """Component a's fraction of the first `examples` examples of the mixture (its cursors)."""
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  from basic.data import mixture  # pylint: disable=g-import-not-at-top
  iterator = pipeline.make_train_iterator(config, tokenizer)
  steps = examples // config.batch_size
  for _ in range(steps):
    next(iterator)
  taken = iterator.state()['streams']
  through_iterator = taken['a']['step'] / (steps * config.batch_size)
  weights = mixture.normalised_weights(config)
  counts = sum(np.bincount(mixture.composition(weights, 4096, 0, s), minlength=2)
               for s in range(245))   # 1,003,520 slots.
  return steps * config.batch_size, through_iterator, counts[0] / counts.sum(), counts.sum()


def mixture_bench(command):
  """Measures; -> the section `## Data mixtures`."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  rows = []
  load_start = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as directory:
    sets = {}
    for width, height, size in input_pipeline._input_cases():  # pylint: disable=protected-access
      key = (width, height)
      if key not in sets:
        sets[key] = {name: _write_set(os.path.join(directory, f'{width}x{height}{name}'),
                                      height, width, seed)
                     for name, seed in (('a', 0), ('b', 1))}
      patterns = {name: pattern for name, (pattern, _) in sets[key].items()}
      model = os.path.join(directory, 'spm.model')
      if not os.path.exists(model):
        tokenizer_lib.train((sets[key]['a'][1] + sets[key]['b'][1]) * 2, 256, model)
      rates = {'tfrecord': [], 'mixture': []}
      cpu_rates = {'tfrecord': [], 'mixture': []}
      for _ in range(FLAGS.mixture_rounds):
        for kind in rates:
          config = _config(kind, patterns, size)
          tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, model,
                                                   config.data.text_length)
          wall, cpu = _rates(config, tokenizer)
          rates[kind].append(wall)
          cpu_rates[kind].append(cpu)
          print(f'{width}x{height} -> {size} px, {kind}: {wall:.0f} images/s, {cpu:.0f} per '
                'CPU second.', flush=True)
      rows.append((width, height, size, rates, cpu_rates))
    config = _config('mixture', patterns, 32)
    tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, model, config.data.text_length)
    examples, fraction, rule_fraction, slots = _fractions(config, tokenizer)
  print(f'fraction of a: {fraction:.4f} over {examples} examples; rule {rule_fraction:.5f}.')
  cell = lambda values: ' / '.join(f'{v:.0f}' for v in values) + (
      f' (median {statistics.median(values):.0f})')
  lines = [
      '## Data mixtures', '',
      f'Command: `{command}`', '',
      f'Machine: {os.cpu_count()} CPU cores, {jax.devices()[0].device_kind}; shared with other '
      f'jobs while it ran (load average {load_start:.1f} at the start, '
      f'{os.getloadavg()[0]:.1f} at the end), so every rate is a lower bound; the two pipelines '
      'alternate within each round and meet the same neighbours.', '',
      f'Data: two sets (a, b) of {FLAGS.input_records} photo-like JPEGs each (quality '
      f'{FLAGS.input_jpeg_quality}) in 4 TFRecord shards each. tfrecord: set a alone; mixture: '
      "config.data.source='mixture' with components a (weight 0.7) and b (0.3), both "
      "'tfrecord'. `pipeline.make_train_iterator` with configs/tiny.py's data defaults, 1 "
      f'tf.data thread, tokenise {FLAGS.input_text_length} tokens, batch '
      f'{FLAGS.input_batch_size}, {FLAGS.input_seconds:.0f} s timed after 3 batches; each cell: '
      'the rounds in order, then the median.', '',
      '| stored JPEG | output | images/s, tfrecord | images/s, mixture | images per CPU '
      'second, tfrecord | images per CPU second, mixture | mixture / tfrecord, medians: '
      'images/s, per CPU second |',
      '|---|---|---|---|---|---|---|',
      *[f'| {w} x {h} | {s} x {s} | {cell(r["tfrecord"])} | {cell(r["mixture"])} | '
        f'{cell(c["tfrecord"])} | {cell(c["mixture"])} | '
        f'{statistics.median(r["mixture"]) / statistics.median(r["tfrecord"]):.2f}x, '
        f'{statistics.median(c["mixture"]) / statistics.median(c["tfrecord"]):.2f}x |'
        for w, h, s, r, c in rows], '',
      f'Fractions: component a (weight 0.7) made {fraction:.4f} of the first {examples} '
      f'examples of the mixture at batch {FLAGS.input_batch_size} (read from the iterator\'s '
      f'component cursors), and {rule_fraction:.5f} of {slots} slots of the composition rule '
      '(`mixture.composition`) at batch 4096.',
  ]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, mixture_bench)
