"""Test setup: the repository on sys.path, TensorFlow quiet, the `slow` marker."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test, excluded from the default suite '
                          '(run with `-m slow`).')
