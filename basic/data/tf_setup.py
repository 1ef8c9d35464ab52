"""Keeps TensorFlow (the input pipeline only) off accelerators and to a few CPU threads.

JAX owns the accelerators; TensorFlow must neither reserve their memory nor take every core.
Call `configure_tensorflow()` before the first TensorFlow op; it is idempotent.
"""
import os

from absl import logging

# Quieter C++ logs unless the user asked otherwise; only effective before TensorFlow is imported.
# TensorFlow itself is imported lazily, so that importing this module costs nothing.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

DEFAULT_THREADS = 2   # TF intra-op and inter-op threads (tf.data has its own pool, see pipeline).

_configured_threads = None


def configure_tensorflow(threads: int = DEFAULT_THREADS):
  """Hides GPUs and TPUs from TensorFlow and limits its op threads; safe to call repeatedly.

  Args:
    threads: intra-op and inter-op parallelism threads (0 = TensorFlow's default, all cores).

  Returns:
    The `tensorflow` module.
  """
  global _configured_threads
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if _configured_threads is not None:
    if threads != _configured_threads:
      logging.warning('configure_tensorflow: already configured with %d threads; ignoring %d.',
                      _configured_threads, threads)
    return tf
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError) as e:  # TF already initialised, or unknown device type.
      logging.warning('configure_tensorflow: could not hide %s devices: %s', device_type, e)
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError as e:  # TF already initialised with other settings.
    logging.warning('configure_tensorflow: could not set threads: %s', e)
  _configured_threads = threads
  return tf
