"""The tree passes the one linter configuration (ruff.toml: pyflakes, syntax errors, line length
100), so the test command checks it."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
  pytest.importorskip('ruff')
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
