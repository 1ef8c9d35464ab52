"""config.init_from_params (a part of a checkpoint: basic.train.params_from_checkpoint, the
tokenizer it implies) and configs/lit.py (the LiT recipe and its runlocal twin)."""
import jax
import numpy as np
import pytest

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import metric_writers
from basic import sharding
from basic import tokenizer as tokenizer_lib
from basic import train
from basic.models import scan
from configs import lit
from configs import tiny
from tests import config_helpers

# A text tower of other sizes than tiny's (2 x 96 wide): a checkpoint's text tower that could not
# be loaded into the model, as an OpenCLIP model's under a LiT text tower.
OTHER_TEXT = {'model.text.depth': 1, 'model.text.width': 64, 'model.text.mlp_dim': 128}
# Tokenizer training captions that are not the synthetic data's.
OTHER_CAPTIONS = [f'zebra {i} quux xylophone {i % 7} wombat' for i in range(200)]


def _params(config, seed: int):
  """Known parameters of the config's model: a normal draw (numpy, `seed`) of each shape, as
  device arrays; what a fresh initialisation is to basic.train.params_from_checkpoint."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype)),
                      scan.abstract_params(config))


def _leaves(params) -> dict:
  return {sharding.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A params-only checkpoint of the tiny model (known parameters, as basic.convert.open_clip
  writes one) with a tokenizer of its own:
  -> (its directory, its parameters as {path: array}, the tokenizer's bytes)."""
  directory = tmp_path_factory.mktemp('source')
  spm_path = tokenizer_lib.train(OTHER_CAPTIONS, 40, str(directory / 'other.model'))
  tokenizer_model = open(spm_path, 'rb').read()
  config = tiny.get_config()
  params = _params(config, seed=0)
  ckpt = checkpoint_lib.Checkpointer(str(directory / 'checkpoints'))
  ckpt.save(1, {'params': params}, config, tokenizer_model=tokenizer_model)
  ckpt.wait()
  ckpt.close()
  return str(directory), _leaves(params), tokenizer_model


def test_init_from_params_takes_the_image_tower_and_keeps_the_fresh_text_tower(source):
  """LIT_PARAMS: the image tower and image_proj equal the checkpoint's bit for bit, every other
  parameter (the text tower of other sizes, the temperature) the fresh initialisation's."""
  directory, saved, _ = source
  fresh = fresh_tree = _params(config_helpers.tiny_config(OTHER_TEXT), seed=1)
  loaded = train.params_from_checkpoint(directory, fresh, lit.LIT_PARAMS)
  assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
  loaded, fresh = _leaves(loaded), _leaves(fresh)
  taken = [n for n in loaded if n.startswith(('image/', 'image_proj/'))]
  kept = [n for n in loaded if n not in taken]
  # Image: 3 blocks x 16 + patch embedding 2 + final LayerNorm 2 + position embedding 1 +
  # image_proj 1; text: 1 block x 16 + 2 + token and position embeddings 2 + text_proj 1; and
  # the temperature.
  assert (len(taken), len(kept)) == (54, 22)
  assert 'log_temperature' in kept and 'text/token_embedding/embedding' in kept
  for name in taken:
    np.testing.assert_array_equal(loaded[name], saved[name], err_msg=name)
    assert loaded[name].dtype == saved[name].dtype
  for name in kept:
    np.testing.assert_array_equal(loaded[name], fresh[name], err_msg=name)
  # Not vacuous: the fresh image tower differs from the checkpoint's.
  assert not np.array_equal(fresh['image_proj/kernel'], saved['image_proj/kernel'])
  # All parameters (the default) cannot be taken: the checkpoint's text tower has other sizes.
  with pytest.raises(ValueError, match='text/'):
    train.params_from_checkpoint(directory, fresh_tree)


def test_init_from_params_matching_no_parameter_fails_naming_the_field(tmp_path):
  params = scan.abstract_params(tiny.get_config())
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.init_from_params=.*'vision/\.\*' matches no parameter"):
    train.params_from_checkpoint(str(tmp_path), params, ('image/.*', 'vision/.*'))


@pytest.mark.parametrize('value, why', [
    ('image/.*', 'must be a tuple of regexes'),
    (('image/[',), 'not a valid regex'),
    ((3,), 'not a regex string'),
])
def test_bad_init_from_params_fail_validation(value, why):
  config = config_helpers.tiny_config({'init_from': '/ckpt', 'init_from_params': value},
                                      type_safe=False)
  with pytest.raises(config_lib.ConfigError, match=f'config.init_from_params=.*{why}'):
    config_lib.validate(config)


def test_init_from_params_needs_init_from():
  config = config_helpers.tiny_config({'init_from_params': lit.LIT_PARAMS})
  with pytest.raises(config_lib.ConfigError, match='config.init_from_params=.*needs config.init'):
    config_lib.validate(config)


def test_the_checkpoint_tokenizer_is_used_only_with_its_text_tower(source, tmp_path):
  """init_from_params () or a text pattern: the checkpoint's tokenizer; LIT_PARAMS (no text
  parameter taken): a tokenizer trained on the run's own captions."""
  directory, _, saved = source
  for patterns, copied in (((), True), (('text/.*',), True), (lit.LIT_PARAMS, False)):
    config = config_helpers.tiny_config({'init_from': directory, 'init_from_params': patterns,
                                         'tokenizer.train_sentences': 1000})
    path = tokenizer_lib.ensure_tokenizer(config, str(tmp_path / str(len(patterns))))
    model = open(path, 'rb').read()
    assert (model == saved) == copied, patterns
    if not copied:   # The synthetic captions' pieces, not OTHER_CAPTIONS' 40.
      assert tokenizer_lib.make_tokenizer(config.tokenizer, path, 16).vocab_size == 256


def test_lit_runlocal_is_the_tiny_run_with_a_locked_checkpoint_image_tower():
  config = lit.get_config('runlocal')
  config_lib.validate(config)
  assert (config.init_from, tuple(config.init_from_params), config.lock_image) == (
      'runs/tiny', lit.LIT_PARAMS, True)
  assert lit.get_config('runlocal,init_from=/tmp/t').init_from == '/tmp/t'
  # Everything else is configs/tiny.py's: the same towers, data, steps and optimiser.
  want = config_lib.flatten(tiny.get_config())
  got = config_lib.flatten(config)
  assert {k for k in got if got[k] != want.get(k)} == {
      'init_from', 'init_from_params', 'lock_image'}
  params = scan.abstract_params(config)    # It builds.
  assert sum(x.size for x in jax.tree.leaves(params)) == 432_769


def test_lit_full_config_takes_the_checkpoint_image_tower(source):
  directory, saved, _ = source
  config = lit.get_config(f'init_from={directory}')
  config_lib.validate(config, num_data_devices=4)
  assert config.model.image.to_dict() == tiny.get_config().model.image.to_dict()
  assert (config.model.embed_dim, config.data.image_size) == (64, 32)
  assert config.data.source == 'tfrecord' and config.tokenizer.model_path == ''
  assert (config.batch_size, config.optimizer.learning_rate) == (4096, 1e-3)
  params = scan.abstract_params(config)    # It builds; the image tower has the checkpoint's shapes.
  got = {sharding.path_str(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)
         if sharding.path_str(p).startswith('image')}
  assert got == {n: v.shape for n, v in saved.items() if n.startswith('image')}
  with pytest.raises(ValueError, match='configs/lit.py needs the checkpoint'):
    lit.get_config()


@pytest.mark.slow
def test_lit_runlocal_trains_a_text_tower_against_the_locked_image_tower(tmp_path):
  """The two runs of the README's LiT twin, 3 steps each: the LiT run's image tower and
  projection end bit-equal to the first run's, and its zero-shot is logged."""
  short = dict(total_steps=3, log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3,
               batch_size=32, microbatch_size=32)
  first, second = str(tmp_path / 'tiny'), str(tmp_path / 'lit')
  for config, workdir in ((tiny.get_config(), first),
                          (lit.get_config(f'runlocal,init_from={first}'), second)):
    config.update(short)
    config.tokenizer.train_sentences = 1000
    train.train_and_evaluate(config, workdir)

  def params(workdir):
    with checkpoint_lib.open_step(workdir) as (ckpt, step):
      assert step == 3
      return _leaves(ckpt.restore_params(step))
  before, after = params(first), params(second)
  image = [n for n in before if n.startswith(('image/', 'image_proj/'))]
  assert len(image) == 54
  for name in image:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  rows = metric_writers.read_jsonl(f'{second}/metrics.jsonl')
  assert any(r['step'] == 3 and 0 <= r.get('zeroshot/top1', -1) <= 1 for r in rows)
