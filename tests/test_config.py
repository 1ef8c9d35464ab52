"""Bad configs fail before any compile, with a message naming the field."""
import os
import re
import subprocess
import sys

import pytest

from basic import config_lib
from configs import tiny
import config_helpers


def _config(**overrides):
  return config_helpers.tiny_config({k.replace('__', '.'): v for k, v in overrides.items()},
                                    type_safe=False)


def test_tiny_config_is_valid():
  config_lib.validate(tiny.get_config())


@pytest.mark.parametrize('overrides, field', [
    ({'batch_size': 100, 'microbatch_size': 64}, 'config.batch_size=100'),
    ({'batch_size': 0}, 'config.batch_size=0'),
    ({'model__image__name': 'resnet9000'}, 'config.model.image.name'),
    ({'model__text__name': 'lstm'}, 'config.model.text.name'),
    ({'data__text_length': 0}, 'config.data.text_length=0'),
    ({'data__image_size': 30}, 'config.model.image.patch_size'),
    ({'model__image__num_heads': 5}, 'config.model.image.num_heads=5'),
    ({'model__text__pool': 'max'}, 'config.model.text.pool'),
    ({'model__image__remat': 'sometimes'}, 'config.model.image.remat'),
    ({'loss': 'triplet'}, 'config.loss'),
    ({'optimizer__name': 'sgd9'}, 'config.optimizer.name'),
    ({'optimizer__learning_rate': -1.0}, 'config.optimizer.learning_rate'),
    ({'data__source': 'laion'}, 'config.data.source'),
    ({'mesh__model': 0}, 'config.mesh.model'),
    ({'tokenizer__kind': 'wordpiece'}, 'config.tokenizer.kind'),
    ({'model__image__activation': 'relu6'}, 'config.model.image.activation'),
    ({'model__image__norm_eps': 0.0}, 'config.model.image.norm_eps'),
    ({'model__image__ln_pre': 'yes'}, 'config.model.image.ln_pre'),
    ({'model__image__patch_bias': 1}, 'config.model.image.patch_bias'),
    ({'model__text__mask_padding': None}, 'config.model.text.mask_padding'),
])
def test_bad_config_names_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(_config(**overrides))


@pytest.mark.parametrize('tower, fields, field', [
    ('vit', {'variant': 'B/16', 'width': 96}, 'config.model.image.width=96'),
    ('coatnet', {'variant': 'coatnet-0', 'depths': (1, 1, 1, 1)}, 'config.model.image.depths'),
    ('convnext', {'variant': 'convnext_atto', 'norm_eps': 1e-5}, 'config.model.image.norm_eps'),
])
def test_a_variant_and_explicit_sizes_fail_naming_the_size(tower, fields, field):
  """Every image tower: a named variant with an explicit size is refused, naming the size."""
  from basic import config_defaults  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.image = config_defaults.tower(tower, **fields)
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.') + '.*unset'):
    config_lib.validate(config)


def test_batch_must_split_over_processes_and_devices():
  with pytest.raises(config_lib.ConfigError, match=r'config\.batch_size=256: .*processes'):
    config_lib.validate(_config(), num_processes=3)
  with pytest.raises(config_lib.ConfigError, match=r'config\.microbatch_size=256: .*devices'):
    config_lib.validate(_config(), num_data_devices=3)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# JAX_LOG_COMPILES=1: jax logs every jit trace / lowering / XLA compile at WARNING
# (jax/_src/pjit.py "Finished tracing ...", interpreters/pxla.py "Compiling ...",
# "Finished jaxpr to MLIR module conversion ...", "Finished XLA compilation of ...").
COMPILE_LOG = re.compile(r'Compiling |Finished tracing|Finished jaxpr to MLIR|'
                         r'Finished XLA compilation')


def test_bad_config_on_the_command_line_fails_before_any_compilation(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_LOG_COMPILES='1')
  # The control: in this environment a jit compile is logged in the wording matched below (a
  # valid `basic.train --config.total_steps=1` logs 8 such compiles; too slow to run here).
  control = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.jit(lambda x: x + 1)(1)'],
      cwd=REPO, env=env, capture_output=True, text=True, check=True)
  assert COMPILE_LOG.search(control.stderr), control.stderr
  workdir = tmp_path / 'w'
  run = subprocess.run(
      [sys.executable, '-m', 'basic.train', '--config=configs/tiny.py', f'--workdir={workdir}',
       '--config.batch_size=100', '--config.microbatch_size=64'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0
  assert 'config.batch_size=100: not divisible by config.microbatch_size=64' in run.stderr
  compiles = [line for line in run.stderr.splitlines() if COMPILE_LOG.search(line)]
  assert not compiles, compiles
  assert not (workdir / 'checkpoints').exists() or not any((workdir / 'checkpoints').iterdir())
  assert not (workdir / 'config.json').exists()
