"""Freezing by config, locked towers, layer-wise lr decay and lr multipliers (basic.freeze).

A locked image tower (config.lock_image) stays bit-identical over training, has no optimiser
state, and the trained side's gradient equals the plain full-batch gradient (no gradient
caching, nothing frozen) within 1e-5; `lock_*_unlocked_blocks` trains exactly the last blocks
(scanned towers per slice); layer_decay and lr_mults give each leaf (each slice) the lr of the
formula.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import freeze
from basic import gradcache
from basic import models
from basic import optim
from basic import sharding
from basic import train
from benchmarks import lit
import config_helpers
import tower_helpers
import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
SMALL = {
    'batch_size': 8, 'microbatch_size': 4, 'total_steps': 10,
    'optimizer.warmup_steps': 0, 'optimizer.learning_rate': 1e-2,
    'model.embed_dim': 32, 'model.image.width': 32, 'model.image.mlp_dim': 64,
    'model.text.width': 32, 'model.text.mlp_dim': 64,
    'model.image.dropout': 0.1, 'model.text.dropout': 0.1,
}


def _config(**overrides):
  config = config_helpers.tiny_config({**SMALL, **overrides})
  config.sharding.rules = models.sharding_rules(config.model)
  config_lib.validate(config)
  return config


def _named(tree):
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {sharding.path_str(p): np.asarray(x) for p, x in leaves}


def _image(path):
  return path.startswith(('image/', 'image_proj/'))


def _run(config, steps=3):
  """-> (initial params, final params, final opt_state, the initial params tree) after `steps`
  jitted train steps."""
  model, tx, schedule, state, _ = train.init_training(config)
  initial = jax.tree.map(jnp.copy, state.params)
  first = _named(initial)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  for k in range(steps):
    state, metrics = step(state, train.random_batch(config, config.batch_size, seed=k),
                          jax.random.key(1))
    assert int(metrics['train/nonfinite']) == 0
  _LAST_STATE[:] = [state]
  return first, _named(state.params), state.opt_state, initial


_LAST_STATE = []


def _reference_grads(config, params, batch, rng):
  """The plain gradient: jax.value_and_grad of the full-batch loss over every parameter (no
  gradient caching, nothing frozen)."""
  model = models.build(config)
  encode_fn, loss_fn = train.make_encode_fn(model), train.make_loss_fn(config)
  k = config.batch_size // config.microbatch_size
  return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, *gradcache.encode_full_batch(
      encode_fn, p, batch, rng, k))))(params)


def _cached_grads(config, params, batch, rng):
  """The train step's gradient-cached gradient (frozen / locked per the config)."""
  model = models.build(config)
  mask = freeze.trainable(params, freeze.rules(config))
  f = gradcache.value_and_grad(
      train.make_encode_fn(model), train.make_loss_fn(config),
      num_microbatches=config.batch_size // config.microbatch_size,
      frozen=freeze.frozen_leaves(mask), locked=freeze.locked_towers(params, freeze.rules(config)),
      encode_side=train.make_encode_side_fn(model))
  return jax.jit(f)(params, batch, rng)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_close(grads, ref, paths):
  """The gradients of `paths` within RTOL of the reference: all of them together, and each
  leaf whose reference norm is above 1e-6 of theirs (attention key biases have a zero gradient
  in exact arithmetic: their float32 values are rounding noise)."""
  flat = lambda tree: np.concatenate([tree[p].ravel() for p in paths])
  assert _rel(flat(grads), flat(ref)) <= RTOL
  total = np.linalg.norm(flat(ref))
  assert total > 0
  for path in paths:
    if np.linalg.norm(ref[path]) > 1e-6 * total:
      assert _rel(grads[path], ref[path]) <= RTOL, (path, _rel(grads[path], ref[path]))


def test_lock_image_three_steps_frozen_bits_no_state_and_exact_text_gradient(tmp_path):
  """lock_image: after 3 steps every image-tower leaf (image_proj included) and its EMA are
  bit-identical, the optimiser state holds no image-tower array (its size: 2 Adam moments of
  the trained leaves plus counters), the text side changed; a checkpoint restores the whole
  state bit-exactly; the gradient-cached gradient of every trained leaf equals the plain
  full-batch gradient within 1e-5 and is exactly 0 on the image tower."""
  config = _config(lock_image=True, ema_decay=0.5,
                   **{'model.image.depth': 1, 'model.text.depth': 1})
  first, last, opt_state, params = _run(config)
  image = [p for p in first if _image(p)]
  assert len(image) > 10
  ema = _named(_LAST_STATE[0].ema)
  for path in image:
    assert np.array_equal(first[path], last[path]), path
    assert np.array_equal(first[path], ema[path]), path
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  ckpt.save(3, _LAST_STATE[0], config)
  ckpt.wait()
  template = train.abstract_train_state(config, models.build(config), optim.make_optimizer(
      config.optimizer, config.total_steps, freeze.rules(config))[0], sharding.make_mesh(
          config.mesh))
  restored = ckpt.restore(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=s), *template), 3)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(_LAST_STATE[0])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_LAST_STATE[0])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  trained = [p for p in first if not _image(p)]
  assert all(not np.array_equal(first[p], last[p]) for p in trained)
  state = _named(opt_state)
  assert not [p for p in state if 'image' in p]
  trained_size = sum(first[p].size for p in trained)
  assert sum(x.size for x in state.values()) <= 2 * trained_size + 8
  assert sum(x.size for x in state.values()) >= 2 * trained_size

  batch = train.random_batch(config, config.batch_size, seed=5)
  rng = jax.random.key(3)
  (loss, grads), (ref_loss, ref) = (_cached_grads(config, params, batch, rng),
                                    _reference_grads(config, params, batch, rng))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=RTOL)
  grads, ref = _named(grads), _named(ref)
  for path in grads:
    if _image(path):
      assert not grads[path].any(), path
      assert ref[path].any(), path    # The reference does differentiate the image tower.
  _assert_close(grads, ref, [p for p in grads if not _image(p)])


def test_locked_step_runs_the_image_tower_once():
  """The K=4 train step's jaxpr, scans counted times their trip counts (benchmarks.lit): the
  image patch-embedding convolution runs 4 times with lock_image (one forward per microbatch),
  12 times unlocked (forward, recomputed forward and kernel gradient per microbatch)."""
  assert lit.image_passes(_config(lock_image=True, batch_size=16)) == 4
  assert lit.image_passes(_config(batch_size=16)) == 12


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_unlocked_blocks_train_exactly_the_last_blocks(scan):
  """lock_image_unlocked_blocks=1 on a 3-block ViT: block 2 (the last slice of a scanned
  stack), ln_final and image_proj change; the embedding, blocks 0-1 (slices 0-1) are
  bit-identical; each trained leaf's gradient equals the plain gradient within 1e-5."""
  config = _config(lock_image=True, lock_image_unlocked_blocks=1,
                   **{'model.image.scan_layers': scan})
  first, last, _, params = _run(config)
  changed = {p for p in first if _image(p) and not np.array_equal(first[p], last[p])}
  if scan:
    stacked = [p for p in first if 'block_scan' in p and _image(p)]
    for p in stacked:
      assert np.array_equal(first[p][:2], last[p][:2]), p
      assert not np.array_equal(first[p][2], last[p][2]), p
    assert changed - set(stacked) == {p for p in first if p.startswith(
        ('image/encoder/ln_final', 'image_proj'))}
  else:
    assert changed == {p for p in first if p.startswith(
        ('image/encoder/block02', 'image/encoder/ln_final', 'image_proj'))}

  batch = train.random_batch(config, config.batch_size, seed=5)
  (_, grads), (_, ref) = (_cached_grads(config, params, batch, jax.random.key(3)),
                          _reference_grads(config, params, batch, jax.random.key(3)))
  grads, ref = _named(grads), _named(ref)
  for path in list(grads):
    if path.startswith('image/encoder/block_scan'):   # Differentiated whole; slice 2 trained.
      grads[path], ref[path] = grads[path][2], ref[path][2]
    elif _image(path) and not path.startswith(
        ('image/encoder/block02', 'image/encoder/ln_final', 'image_proj')):
      assert not grads[path].any(), path
      del grads[path]
  _assert_close(grads, ref, list(grads))


def _expected_layer_scale(path, d, image_depth=3, text_depth=2):
  """The formula, written out per path: d^(L + 1 - layer)."""
  for side, depth in (('image', image_depth), ('text', text_depth)):
    if path.startswith(f'{side}_proj/'):
      return 1.0
    if path.startswith(f'{side}/'):
      rest = path[len(side) + 1:]
      if rest.startswith(('embedding', 'pos_embedding', 'token_embedding', 'cls')):
        return d ** (depth + 1)
      if rest.startswith('encoder/block_scan'):
        return d ** (depth + 1 - np.arange(1, depth + 1))
      if rest.startswith('encoder/block'):
        return d ** (depth - int(rest[len('encoder/block'):len('encoder/block') + 2]))
      assert rest.startswith('encoder/ln_final'), path
      return 1.0
  return 1.0


@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_layer_decay_and_lr_mults_scale_each_leaf_by_the_formula(scan):
  """Per leaf (per slice of a scanned stack): the AdamW update with layer_decay=0.5 and
  lr_mults (('text/token_embedding/.*', 3.0), ('text/.*', 0.25)) equals the plain update times
  0.5^(L + 1 - layer) times the first matching multiplier, within 1e-6."""
  d = 0.5
  config = _config(**{'model.image.scan_layers': scan, 'optimizer.layer_decay': d,
                      'optimizer.grad_clip_norm': 0.0,
                      'optimizer.lr_mults': (('text/token_embedding/.*', 3.0), ('text/.*', 0.25))})
  batch = train.random_batch(config, 2)
  params = tower_helpers.random_params(models.build(config), batch)
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p + 1.0), params)
  plain, _ = optim.make_optimizer(config.optimizer, 10, freeze.Rules())
  ruled, _ = optim.make_optimizer(config.optimizer, 10, freeze.rules(config))
  want = _named(plain.update(grads, plain.init(params), params)[0])
  got = _named(ruled.update(grads, ruled.init(params), params)[0])
  for path, u in want.items():
    scale = np.asarray(_expected_layer_scale(path, d))
    mult = 3.0 if path.startswith('text/token_embedding') else (
        0.25 if path.startswith('text/') else 1.0)
    expected = u * (scale * mult).reshape(scale.shape + (1,) * (u.ndim - scale.ndim))
    np.testing.assert_allclose(got[path], expected, rtol=1e-6, atol=1e-12, err_msg=path)
  assert len({float(np.max(np.abs(got[p] / np.where(want[p] == 0, 1, want[p]))))
              for p in want}) >= 4   # Not vacuous: several distinct scales.


def test_layer_ids_of_convnext_stages_flatten_in_order():
  """ConvNeXt depths (2, 2): stem 0, stage0 blocks 1-2, stage1's downsample and first block 3,
  its second block 4 (scanned stacks: [2] and [4]), head_norm and image_proj 5; L = 4."""
  from basic.models import convnext   # pylint: disable=g-import-not-at-top
  want = {'stem': 0, 'stage0_block00': 1, 'stage0_block01': 2, 'stage0_block_scan': [2],
          'stage1_downsample': 3, 'stage1_block00': 3, 'stage1_block01': 4,
          'stage1_block_scan': [4], 'head_norm': 5}
  for scan in (False, True):
    tower = convnext.ConvNeXt(depths=(2, 2), dims=(8, 16), norm_eps=1e-6, scan_layers=scan)
    shapes = jax.eval_shape(lambda t=tower: t.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
                            )['params']
    params = {'image': shapes,
              'image_proj': {'kernel': jax.ShapeDtypeStruct((16, 4), jnp.float32)}}
    ids = {p: np.asarray(v).tolist() for p, v in _named(freeze.layer_ids(params)).items()}
    assert ids.pop('image_proj/kernel') == 5
    assert len(ids) > 10
    for path, layer in ids.items():
      key = next(k for k in want if path.split('/')[1].startswith(k))
      assert layer == want[key], (path, layer)
    assert freeze.tower_depths(params)['image'] == 4


@pytest.mark.slow
def test_lock_on_a_4x2_mesh_with_fsdp():
  """lock_image with unlocked_blocks=1 on a (4, 2) mesh with FSDP: 3 steps give the same
  parameters as one device within 1e-5; frozen leaves bit-identical to the initial ones
  (tests/freeze_mesh_worker.py)."""
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'freeze_mesh_worker.py')],
                       env=cpu_devices.env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK' in out.stdout


@pytest.mark.parametrize('field, value', [
    ('lock_image_unlocked_blocks', 4),
])
def test_unlocked_blocks_beyond_the_depth_fail_naming_the_field(field, value):
  config = _config(lock_image=True, **{field: value})
  with pytest.raises(ValueError, match=f'config.{field}={value}'):
    train.init_training(config)


@pytest.mark.parametrize('fields, message', [
    ({'lock_text_unlocked_blocks': 1}, 'config.lock_text_unlocked_blocks=1'),
    ({'lock_image': True, 'lock_image_unlocked_blocks': -1}, 'config.lock_image_unlocked_blocks'),
    ({'optimizer.frozen': ('image/[',)}, 'config.optimizer.frozen'),
    ({'optimizer.layer_decay': 0.0}, 'config.optimizer.layer_decay=0.0'),
    ({'optimizer.layer_decay': 1.5}, 'config.optimizer.layer_decay=1.5'),
    ({'optimizer.lr_mults': (('text/.*', -1.0),)}, 'config.optimizer.lr_mults'),
    ({'optimizer.lr_mults': (('text/.*',),)}, 'config.optimizer.lr_mults'),
    ({'lock_image': 1}, 'config.lock_image=1'),
])
def test_bad_values_fail_naming_the_field(fields, message):
  config = config_helpers.tiny_config(fields, type_safe=False)
  with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[').replace(
      '.', r'\.')):
    config_lib.validate(config)


def test_resuming_with_another_freezing_fails_naming_the_field():
  saved = config_helpers.tiny_config({})
  for fields, name in (({'lock_image': True}, 'config.lock_image'),
                       ({'optimizer.frozen': ('text/.*',)}, 'config.optimizer.frozen')):
    with pytest.raises(config_lib.ConfigError, match=name.replace('.', r'\.')):
      config_lib.resume_diff(saved, config_helpers.tiny_config(fields))
  assert config_lib.resume_diff(saved, config_helpers.tiny_config(
      {'optimizer.layer_decay': 0.7}))['allowed']


@pytest.mark.slow
def test_frozen_regex_freezes_matching_leaves_only():
  """optimizer.frozen=('text/encoder/block00/.*', 'log_temperature'): those leaves keep their
  bits over 3 steps and have no optimiser state; every other leaf changes."""
  config = _config(**{'optimizer.frozen': ('text/encoder/block00/.*', 'log_temperature')})
  first, last, opt_state, _ = _run(config)
  frozen = {p for p in first if p.startswith('text/encoder/block00/') or p == 'log_temperature'}
  assert len(frozen) > 5
  assert {p for p in first if np.array_equal(first[p], last[p])} == frozen
  assert not [p for p in _named(opt_state) if 'text/encoder/block00/' in p]
  assert freeze.locked_towers(first, freeze.rules(config)) == ()
