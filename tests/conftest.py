"""Test setup: the repository on sys.path, TensorFlow quiet, a compilation cache, `slow`."""
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX on the CPU in every test process and the subprocesses they start: with libtpu installed
# (the `tpu` extra) JAX would otherwise try a TPU backend first, and take libtpu's lock file.
# Tests that compile for a TPU topology (tests/test_plan_tpu.py) load libtpu themselves; two
# pytest-xdist workers may, hence ALLOW_MULTIPLE_LIBTPU_LOAD.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# One persistent XLA compilation cache per test session, inherited by the subprocesses tests
# start: the many short training runs compile the same train step.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='basic_jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The triton of CUDA builds of torch (the `convert` extra; open_clip imports it through
# torch._dynamo) segfaults on import when TensorFlow was imported before it, as other test
# modules do; imported first, both load.
try:
  import triton  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test, excluded from the default suite '
                          '(run with `-m slow`).')
