"""A toy data source for tests/test_extensions.py: one file, registered by one line
(`basic.data.SOURCES.register('toy_colours', 'toy_source')`).

Example i of the stream is a solid-colour image of colour i % K with the caption
'a <colour> picture': a pure function of its index, so the batch of step s is examples
s * N .. (s + 1) * N - 1 (host p taking its slice) and resuming by step is exact.
"""
import numpy as np

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'black')
RGB = np.array([(220, 30, 30), (30, 200, 30), (40, 60, 230), (230, 220, 30), (150, 40, 190),
                (250, 140, 20), (245, 245, 245), (10, 10, 10)], np.uint8)

DEFAULTS = {'toy_colours': {'num_colours': 4}}


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  k = config_lib.check_int(config, 'data.toy_colours.num_colours', 1)
  if k > len(COLOURS):
    config_lib.fail('data.toy_colours.num_colours', k, f'must be <= {len(COLOURS)}.')


def examples(config, indices):
  """-> (uint8 [n, S, S, 3] images, [n] captions) of stream examples `indices`."""
  k = config.data.toy_colours.num_colours
  colour = np.asarray(indices) % k
  size = config.data.image_size
  images = np.broadcast_to(RGB[colour][:, None, None, :], (len(colour), size, size, 3)).copy()
  return images, [f'a {COLOURS[c]} picture' for c in colour]


def batches(config, handle, *, start_step, start_position, local_batch, process_index,
            process_count):
  del handle, start_position, process_count
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = config.data.image_size

  def generate(step):
    first = int(step) * config.batch_size + process_index * local_batch
    images, captions = examples(config, np.arange(first, first + local_batch))
    return images, np.array([c.encode() for c in captions], dtype=object)

  def batch(step):
    image, caption = tf.numpy_function(generate, [step], [tf.uint8, tf.string], stateful=False)
    return {'image': tf.ensure_shape(image, [local_batch, size, size, 3]),
            'caption': tf.ensure_shape(caption, [local_batch]),
            'position': (step + 1) * local_batch}

  return tf.data.Dataset.counter(start=start_step, dtype=tf.int64).map(batch)


def captions(config, n):
  return iter(examples(config, np.arange(n))[1])
