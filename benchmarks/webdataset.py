r"""Webdataset vs TFRecord input; not part of the test suite.

  python -m benchmarks.webdataset [--webdataset_rounds=2] [--out=BENCHMARKS.md]

Writes the same 512 x 384 JPEGs as img2dataset writes them in both formats (4 TFRecord shards; 4
webdataset tar shards with .jpg, .txt and .json members) and measures, in --webdataset_rounds
rounds alternating the two sources, the raw record stream of each source (records/s, nothing
decoded) and the training pipeline at 224 px (images/s and images per CPU second with 1 tf.data
thread; images/s with all cores).
With --out it replaces (or appends) the section `## Webdataset input`. The images, the pipeline
measurement and the --input_* flags are benchmarks/input_pipeline.py's.
"""
import json
import os
import statistics
import time

from absl import flags
import jax

from basic import config_lib
from benchmarks import common
from benchmarks import input_pipeline
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_integer('webdataset_rounds', 2, 'Rounds alternating the sources.')

MODULE = 'benchmarks.webdataset'


def _write_both_formats(directory, height, width, num_shards=4):
  """FLAGS.input_records JPEGs as TFRecord shards and as webdataset tar shards (the same images
  and captions, dealt round-robin); returns (TFRecord pattern, tar pattern, captions)."""
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  from basic.data import write_tfrecords  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  os.makedirs(directory)
  records = [tf.io.TFRecordWriter(os.path.join(directory, f'{s:05d}.tfrecord'))
             for s in range(num_shards)]
  tars = [tarfile.open(os.path.join(directory, f'{s:05d}.tar'), 'w') for s in range(num_shards)]
  captions = []
  images = input_pipeline.photo_like_images(FLAGS.input_records, height, width)
  for i, (image, caption) in enumerate(images):
    jpeg = tf.io.encode_jpeg(image, quality=FLAGS.input_jpeg_quality).numpy()
    captions.append(caption)
    key = f'{i % num_shards:05d}{i // num_shards:04d}'
    records[i % num_shards].write(write_tfrecords.make_example(
        key, jpeg, caption, width, height).SerializeToString())
    meta = json.dumps({'url': f'https://example.com/{key}.jpg', 'caption': caption, 'key': key,
                       'width': width, 'height': height}).encode()
    for ext, data in (('jpg', jpeg), ('txt', caption.encode()), ('json', meta)):
      info = tarfile.TarInfo(f'{key}.{ext}')
      info.size = len(data)
      tars[i % num_shards].addfile(info, io.BytesIO(data))
  for f in records + tars:
    f.close()
  return (os.path.join(directory, '*.tfrecord'), os.path.join(directory, '*.tar'), captions)


def _raw_rate(config, seconds):
  """Records/s of a source's raw host stream (read and grouped, nothing decoded)."""
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  from basic.data import sources  # pylint: disable=g-import-not-at-top
  from basic.data import webdataset  # pylint: disable=g-import-not-at-top
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  host = pipeline.check_source(config)
  data = config.data
  if config.data.source == 'webdataset':
    stream = webdataset.record_stream(host, data)
  else:
    stream = sources.epoch_records(host, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
                                   cycle_length=data.cycle_length, cache=False)
  options = tf.data.Options()
  options.threading.private_threadpool_size = os.cpu_count()
  records = iter(stream.batch(256).prefetch(2).with_options(options))
  next(records)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += int(tf.shape(tf.nest.flatten(next(records))[-1])[0])
  return count / (time.perf_counter() - start)


def _pipeline_rates(config, tokenizer, threads):
  """(images/s, images per CPU second of this process) of make_train_iterator with `threads`
  tf.data threads, over --input_seconds after 3 batches. The CPU figure counts the work of the
  pipeline's threads, not the time they wait for a core, so it is the steadier of the two on a
  shared machine."""
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  config.data.threads = threads
  batches = pipeline.make_train_iterator(config, tokenizer)
  for _ in range(3):
    next(batches)
  cpu = lambda: sum(os.times()[:2])
  count, start, cpu_start = 0, time.perf_counter(), cpu()
  while time.perf_counter() - start < FLAGS.input_seconds:
    count += next(batches)['image'].shape[0]
  return count / (time.perf_counter() - start), count / (cpu() - cpu_start)


def _tar_reader_rates(pattern, config):
  """Samples/s of the tar reader in Python: read, made into records, counted (best of 3)."""
  from basic.data import webdataset  # pylint: disable=g-import-not-at-top
  paths = webdataset.shard_files(pattern)
  fmt = webdataset.Format.from_config(config.data)
  ways = {
      'read': lambda p: sum(1 for _ in webdataset.read_samples(p)),
      'records': lambda p: sum(len(c) for c in webdataset.shard_records(p.encode(), fmt)),
      'count': webdataset.count_samples,
  }
  rates = {}
  for name, way in ways.items():
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      count = sum(way(p) for p in paths)
      best = min(best, time.perf_counter() - start)
    rates[name] = count / best
  return rates


def webdataset_bench(command):
  """Measures; -> the section `## Webdataset input`."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  cores, size = os.cpu_count(), 224
  width, height = 512, 384
  load_start = os.getloadavg()[0]
  results = {}   # (source, measure) -> [rate per round]
  with tempfile.TemporaryDirectory() as directory:
    tfrecords, tars, captions = _write_both_formats(os.path.join(directory, 'shards'), height,
                                                    width)
    model = tokenizer_lib.train(captions * 4, 256, os.path.join(directory, 'spm.model'))
    configs = {}
    for source, pattern in (('tfrecord', tfrecords), ('webdataset', tars)):
      config = tiny.get_config()
      config.batch_size = config.microbatch_size = FLAGS.input_batch_size
      config.data.update(dict(source=source, image_size=size,
                              text_length=FLAGS.input_text_length,
                              **{f'{source}_pattern': pattern}))
      config_lib.validate(config)
      configs[source] = config
    tokenizer = tokenizer_lib.make_tokenizer(configs['tfrecord'].tokenizer, model,
                                             FLAGS.input_text_length)
    reader = _tar_reader_rates(tars, configs['webdataset'])
    for r in range(FLAGS.webdataset_rounds):
      order = ('tfrecord', 'webdataset') if r % 2 == 0 else ('webdataset', 'tfrecord')
      for source in order:
        rates = {'raw': _raw_rate(configs[source], FLAGS.input_seconds / 3)}
        rates['one'], rates['cpu'] = _pipeline_rates(configs[source], tokenizer, 1)
        rates['all'], _ = _pipeline_rates(configs[source], tokenizer, cores)
        for measure, rate in rates.items():
          results.setdefault((source, measure), []).append(rate)
        print(f'round {r} {source}: ' + ', '.join(f'{k} {v:.0f}' for k, v in rates.items()),
              flush=True)
  median = lambda source, measure: statistics.median(results[(source, measure)])
  fmt = lambda source, measure: ' / '.join(f'{x:.0f}' for x in results[(source, measure)])
  lines = [
      '## Webdataset input', '',
      f'Command: `{command}`', '',
      f'Machine: {cores} CPU cores, {jax.devices()[0].device_kind}; shared with other jobs while '
      f'it ran (load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the '
      'end), so every rate is a lower bound; the two sources alternate within each round and '
      'meet the same neighbours.', '',
      f'Data: the same {FLAGS.input_records} photo-like {width} x {height} JPEGs (quality '
      f'{FLAGS.input_jpeg_quality}) as 4 TFRecord shards in img2dataset\'s schema and as 4 '
      "webdataset tar shards as img2dataset writes them (per key .jpg, .txt, .json). 'raw': "
      'the source\'s host record stream (TFRecord: records read; webdataset: tar members read by '
      'the Python reader, grouped into samples and turned into records), nothing decoded, '
      f'{FLAGS.input_seconds / 3:.0f} s. Pipeline: `pipeline.make_train_iterator` with '
      "`configs/tiny.py`'s data defaults at 224 px (decode + random resized crop + resize + "
      f'tokenise {FLAGS.input_text_length} tokens + batch {FLAGS.input_batch_size}), '
      f'{FLAGS.input_seconds:.0f} s after 3 batches. Each cell: the rounds in order, then '
      'the median. Images per CPU second: images over the user + system CPU time of the '
      'process in the same window (the work done, not the wait for a core).', '',
      '| source | raw records/s | images/s, 1 tf.data thread | images per CPU second, '
      f'1 thread | images/s, {cores} threads |', '|---|---|---|---|---|',
      *[f'| {source} | {fmt(source, "raw")} (median {median(source, "raw"):.0f}) | '
        f'{fmt(source, "one")} ({median(source, "one"):.0f}) | '
        f'{fmt(source, "cpu")} ({median(source, "cpu"):.0f}) | '
        f'{fmt(source, "all")} ({median(source, "all"):.0f}) |'
        for source in ('tfrecord', 'webdataset')], '',
      'webdataset / TFRecord, medians: '
      f'raw {median("webdataset", "raw") / median("tfrecord", "raw"):.2f}x, '
      f'1 thread {median("webdataset", "one") / median("tfrecord", "one"):.2f}x, '
      f'per CPU second {median("webdataset", "cpu") / median("tfrecord", "cpu"):.2f}x, '
      f'{cores} threads {median("webdataset", "all") / median("tfrecord", "all"):.2f}x.', '',
      'The tar reader alone (one Python thread, the 4 shards in turn, best of 3): '
      f'{reader["read"]:.0f} samples/s read (members grouped by key), {reader["records"]:.0f} '
      f'samples/s made into records, {reader["count"]:.0f} samples/s counted from the headers '
      '(the resume path: member data skipped).',
  ]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, webdataset_bench)
