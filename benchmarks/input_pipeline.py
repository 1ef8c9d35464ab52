r"""Input pipeline throughput; not part of the test suite.

  python -m benchmarks.input_pipeline [--out=BENCHMARKS.md]

Measures the tf.data input pipeline (basic/data/pipeline.py) on JPEG TFRecord shards in
img2dataset's schema that it writes first (photo-like images: smooth shapes, gradients and
grain): decode + random resized crop + tokenise, in images/s with 1 tf.data thread (per CPU
core) and with all cores, from 512 x 384 JPEGs to 224 x 224 and to the tiny config's 32 x 32,
and from 64 x 64 JPEGs to 32 x 32; then the images/s the tiny config's train step consumes, on
the same machine. With --out it replaces (or appends) the section `## Input pipeline` of that
markdown file.
"""
import os
import time

from absl import flags
import jax
import numpy as np

from basic import config_lib
from benchmarks import common
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_integer('input_records', 512, 'JPEG records written per stored image size.')
flags.DEFINE_list('input_cases', ['512x384:224', '512x384:32', '64x64:32'],
                  'Measurements WIDTHxHEIGHT:SIZE: stored JPEG size, output size.')
flags.DEFINE_integer('input_jpeg_quality', 90, 'JPEG quality of the stored images.')
flags.DEFINE_integer('input_text_length', 64, 'Tokens per caption.')
flags.DEFINE_integer('input_batch_size', 64, 'Batch size of the measured pipeline.')
flags.DEFINE_float('input_seconds', 15.0, 'Timed seconds per measurement (after warm-up).')

MODULE = 'benchmarks.input_pipeline'


def photo_like_images(n, height, width, seed=0):
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
  for i, (image, caption) in enumerate(photo_like_images(n, height, width)):
    jpeg = tf.io.encode_jpeg(image, quality=FLAGS.input_jpeg_quality).numpy()
    total += len(jpeg)
    captions.append(caption)
    writers[i % num_shards].write(write_tfrecords.make_example(
        f'{i:09d}', jpeg, caption, width, height).SerializeToString())
  for w in writers:
    w.close()
  return os.path.join(directory, '*.tfrecord'), total / n, captions


def input_rate(config, tokenizer, threads):
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
  step, state, batch, rng, _ = common.train_step(config, config.batch_size)
  seconds = common.median_step_s(step, state, jax.device_put(batch), rng, repeats)
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
  """Measures; -> the section `## Input pipeline`."""
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
      one = input_rate(config, tokenizer, 1)
      every = input_rate(config, tokenizer, cores)
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
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, input_bench)
