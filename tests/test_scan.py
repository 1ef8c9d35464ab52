"""Layer scanning (basic/models/scan.py): scanned towers equal unscanned ones, forward and
gradients, with dropout / drop path and remat; the parameter layouts convert exactly; sharding
rules, FSDP, optimiser masks and clipping, param counts and the OpenCLIP converter see a stacked
parameter as its unscanned blocks."""
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from basic import optim
from basic import sharding
from basic.models import coatnet
from basic.models import convnext
from basic.models import scan
from basic.models import text as text_lib
from basic.models import vit
from basic.plan import param_counts
from configs import basic_l
from configs import tiny


def _relative_error(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b)
  num = np.sqrt(sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b)))
  return num / np.sqrt(sum(float(np.sum(np.asarray(y) ** 2)) for y in b))


def _random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


# Small towers, each with stochastic regularisation on and identical blocks to scan: ViT and
# text 3 blocks; ConvNeXt stage 1 = its first block + a scan of 2; CoAtNet an MBConv stage of
# first block + a scan of 1 and a Transformer stage of first block + a scan of 2.
def _tower(kind, scan_layers, remat):
  common = dict(remat=remat, scan_layers=scan_layers)
  if kind == 'vit':
    return vit.ViT(patch_size=4, width=16, depth=3, num_heads=2, mlp_dim=32, dropout=0.2,
                   **common), jnp.zeros((2, 16, 16, 3))
  if kind == 'text':
    return text_lib.TextTransformer(vocab_size=50, width=16, depth=3, num_heads=2, mlp_dim=32,
                                    causal=True, dropout=0.2, **common), \
        jnp.zeros((2, 8), jnp.int32)
  if kind == 'convnext':
    return convnext.ConvNeXt(depths=(1, 3), dims=(8, 16), norm_eps=1e-6, drop_path=0.4,
                             **common), \
        jnp.zeros((2, 16, 16, 3))
  return coatnet.CoAtNet(stem_dim=8, depths=(2, 3), dims=(8, 16), block_types='CT',
                         head_dim=8, drop_path=0.4, **common), jnp.zeros((2, 16, 16, 3))


def _inputs(kind, like, seed):
  rng = np.random.default_rng(seed)
  if kind == 'text':
    tokens = rng.integers(1, 50, like.shape)
    tokens[0, 6:] = 0                                    # Padding too.
    return jnp.asarray(tokens, jnp.int32)
  return jnp.asarray(rng.normal(size=like.shape), jnp.float32)


@pytest.mark.parametrize('remat', ['full', pytest.param('none', marks=pytest.mark.slow)])
@pytest.mark.parametrize('kind', ['vit', 'text', 'convnext', 'coatnet'])
def test_scanned_tower_equals_unscanned(kind, remat):
  """Same outputs (rel <= 1e-6) and gradients (rel <= 1e-5) in training mode, with the same
  dropout / drop-path masks: block l's key is fold_in(k, l) in both layouts."""
  plain, example = _tower(kind, False, remat)
  scanned, _ = _tower(kind, True, remat)
  x = _inputs(kind, example, seed=1)
  params = _random_like(jax.eval_shape(plain.init, jax.random.key(0), x)['params'])
  like = jax.eval_shape(scanned.init, jax.random.key(0), x)['params']
  stacked = scan.to_layout(params, like)
  assert jax.tree.structure(stacked) == jax.tree.structure(like)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, like)
  layers = {'vit': ('encoder', 'block_scan', 3), 'text': ('encoder', 'block_scan', 3),
            'convnext': ('stage1_block_scan', None, 2),
            'coatnet': ('stage2_block_scan', None, 2)}[kind]
  group = stacked[layers[0]] if layers[1] is None else stacked[layers[0]][layers[1]]
  assert {np.shape(a)[0] for a in jax.tree.leaves(group)} == {layers[2]}

  def step(model):
    def loss(p, inputs, rng):
      out = model.apply({'params': p}, inputs, train=True, rngs={'dropout': rng})
      return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  rng = jax.random.key(7)
  (_, out), grads = step(plain)(params, x, rng)
  run = step(scanned)
  (_, out_scan), grads_scan = run(stacked, x, rng)
  assert _relative_error(out_scan, out) <= 1e-6
  assert _relative_error(scan.to_layout(grads_scan, params), grads) <= 1e-5
  # Dropout / drop path is really on: another key gives other outputs.
  (_, other), _ = run(stacked, x, jax.random.key(8))
  assert _relative_error(other, out) > 1e-3


def _small_coatnet_config(scan_layers):
  config = tiny.get_config()
  config.model.image = ml_collections.ConfigDict(dict(
      name='coatnet', variant='', stem_dim=8, depths=(1, 3, 1, 2), dims=(8, 16, 16, 16),
      block_types='CCTT', strides=(2, 2, 2, 2), head_dim=8, drop_path=0.0, remat='none',
      scan_layers=scan_layers))
  config.model.text.depth = 3
  config.model.text.scan_layers = scan_layers
  return config


def test_layouts_convert_exactly_and_name_the_blocks():
  plain = scan.abstract_params(_small_coatnet_config(False))
  stacked_like = scan.abstract_params(_small_coatnet_config(True))
  image = stacked_like['image']
  # A stage's first block stays; the rest stack (stage 3 has one block: nothing to scan).
  assert {'stage2_block00', 'stage2_block_scan', 'stage3_block00', 'stage4_block_scan'} <= set(
      image) and 'stage2_block01' not in image and 'stage3_block_scan' not in image
  assert image['stage2_block_scan']['expand']['kernel'].shape == (
      2,) + plain['image']['stage2_block01']['expand']['kernel'].shape
  assert set(stacked_like['text']['encoder']) == {'block_scan', 'ln_final'}
  params = _random_like(plain)
  stacked = scan.to_layout(params, stacked_like)
  np.testing.assert_array_equal(stacked['text']['encoder']['block_scan']['mlp']['fc1'][
      'kernel'][2], params['text']['encoder']['block02']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(stacked['image']['stage2_block_scan']['project']['kernel'][0],
                                params['image']['stage2_block01']['project']['kernel'])
  for back in (scan.to_layout(stacked, plain), scan.unstack(stacked)):
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(params)))
  assert scan.to_layout(stacked, stacked_like) is not None      # Scanned -> scanned: as is.
  del params['text']['encoder']['block02']
  with pytest.raises(ValueError, match='text/encoder/block_scan stacks 3 blocks'):
    scan.to_layout(params, stacked_like)


@pytest.fixture(scope='module')
def basic_l_params():
  """BASIC-L's parameter shapes, unscanned and scanned (CoAtNet-7 stages, 12-layer text)."""
  out = {}
  for scan_layers in (False, True):
    config = basic_l.get_config()
    config.model.image.scan_layers = config.model.text.scan_layers = scan_layers
    out[scan_layers] = (config, scan.abstract_params(config))
  return out


def test_sharding_and_param_counts_of_stacked_params_equal_their_blocks(basic_l_params):
  """Rules (written for one block) + FSDP give a stacked parameter P(None, *spec of each of its
  blocks); param counts (basic.plan) are equal."""
  (config, plain), (_, stacked) = basic_l_params[False], basic_l_params[True]
  assert param_counts(plain) == param_counts(stacked)
  assert 'stage4_block_scan' in stacked['image'] and 'block_scan' in stacked['text']['encoder']
  mesh = jax.sharding.AbstractMesh((128, 4), ('data', 'model'))
  kwargs = dict(fsdp=True, fsdp_min_size=config.sharding.fsdp_min_size)
  rules = config.sharding.rules
  specs = sharding.param_partition_specs(plain, rules, mesh, **kwargs)
  stacked_specs = sharding.param_partition_specs(stacked, rules, mesh, **kwargs)
  assert sharding.unmatched_params(stacked, rules, 2**16) == []
  is_spec = lambda s: isinstance(s, P)
  flat = lambda tree: {sharding.path_str(k): v for k, v in
                       jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_spec)}
  plain_specs, stacked_flat = flat(specs), flat(stacked_specs)
  blocks = {}   # Stacked path -> the specs of the unscanned blocks it holds.
  for path, spec in plain_specs.items():
    if path in stacked_flat:
      assert stacked_flat[path] == spec, path       # Unstacked parameters: unchanged.
    else:
      blocks.setdefault(re.sub(r'(block)\d+/', r'\1_scan/', path), []).append(spec)
  assert set(blocks) == {p for p in stacked_flat if sharding.stacked_dims(p)}
  full = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))   # P() == P(None, None).
  ndim = {sharding.path_str(k): len(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
      stacked)}
  checked = 0
  for path, block_specs in blocks.items():
    assert len(set(block_specs)) == 1, path
    assert full(stacked_flat[path], ndim[path]) == (None,) + full(
        block_specs[0], ndim[path] - 1), path
    checked += 1
  assert checked >= 80          # Every stacked leaf of 5 CoAtNet stages and the text tower.
  mlp = stacked_specs['image']['stage4_block_scan']['mlp_in']['kernel']
  assert mlp == P(None, 'data', 'model')           # Tensor parallel + FSDP, never the layers.
  # A rule's spec counts a block's dimensions; a wrong rank names both counts.
  with pytest.raises(ValueError, match=r'the spec has 3 entries but the parameter has 2 '
                                       r'dimensions \(1 stacked layer axis'):
    sharding.param_partition_specs(
        {'enc': {'block_scan': {'w': jax.ShapeDtypeStruct((4, 8, 8), jnp.float32)}}},
        (('w$', (None, None, 'model')),), mesh)


def _stacked_tree(seed):
  """A small tree with a stacked group (3 layers, of different scales) beside unstacked ones."""
  rng = np.random.default_rng(seed)
  a = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  s = lambda *shape: a(*shape) * jnp.arange(1., 4.).reshape((3,) + (1,) * (len(shape) - 1))
  return {'enc': {'block_scan': {'dense': {'kernel': s(3, 8, 12), 'bias': s(3, 12)},
                                 'ln': {'scale': s(3, 8)}, 'gain': s(3, 4, 6, 8)},
                  'ln_final': {'scale': a(8)}},
          'proj': {'kernel': a(8, 4)}, 'log_temperature': a()}


def test_optimiser_treats_stacked_params_as_their_blocks():
  params = _stacked_tree(0)
  plain = scan.unstack(params)
  mask = optim.weight_decay_mask(params)
  assert mask['enc']['block_scan'] == {'dense': {'kernel': True, 'bias': False},
                                       'ln': {'scale': False}, 'gain': True}
  plain_mask = optim.weight_decay_mask(plain)
  assert [plain_mask['enc'].pop(f'block{i:02d}') for i in range(3)] == [
      mask['enc'].pop('block_scan')] * 3
  assert plain_mask == mask == {'enc': {'ln_final': {'scale': False}}, 'proj': {'kernel': True},
                                'log_temperature': False}
  opt = basic_l.get_config().optimizer       # Adafactor: factored, clipping, momentum, decay.
  opt.update(dict(warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0,
                  min_dim_size_to_factor=4, clipping_threshold=0.5))
  # (AdamW is elementwise: only its mask, checked above, sees the layout.)
  tx, _ = optim.make_optimizer(opt, total_steps=10)

  @jax.jit
  def steps(params, stacked_grads):   # A step per gradient; the updates of each.
    state, updates = tx.init(params), []
    for g in stacked_grads:
      g = g if 'block_scan' in params['enc'] else scan.unstack(g)
      update, state = tx.update(g, state, params)
      params = optax.apply_updates(params, update)
      updates.append(update)
    return params, updates

  grads = [_stacked_tree(step + 1) for step in range(2)]
  (stacked_end, stacked_updates), (plain_end, plain_updates) = steps(params, grads), steps(
      plain, grads)
  for stacked_update, plain_update in zip(stacked_updates, plain_updates):
    assert _relative_error(scan.unstack(stacked_update), plain_update) <= 1e-6
  moved = _relative_error(plain_end, plain)
  assert moved > 1e-5 and _relative_error(scan.unstack(stacked_end), plain_end) <= 1e-6
  opt.min_dim_size_to_factor = 3            # A layer axis that could be factored: refused.
  tx, _ = optim.make_optimizer(opt, total_steps=10)
  with pytest.raises(ValueError, match='config.optimizer.min_dim_size_to_factor=3'):
    tx.init(params)


def test_open_clip_converter_writes_the_scanned_layout(tmp_path):
  """--scan_layers: the config scans both towers, the parameters are the unscanned conversion
  stacked (exactly), and the checkpoint gives OpenCLIP's embeddings."""
  pytest.importorskip('open_clip')
  torch = pytest.importorskip('torch')
  import test_convert_open_clip as helpers  # pylint: disable=g-import-not-at-top
  from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from basic.convert import open_clip as convert_lib  # pylint: disable=g-import-not-at-top
  cfg = helpers.TINY
  torch.manual_seed(0)
  model = helpers.open_clip.model.CLIP(embed_dim=cfg['embed_dim'], vision_cfg=cfg['vision_cfg'],
                                       text_cfg=cfg['text_cfg'], quick_gelu=True).eval()
  torch.save(helpers._perturb(model, seed=1), tmp_path / 'tiny.pt')  # pylint: disable=protected-access
  (tmp_path / 'tiny.json').write_text(helpers.json.dumps(cfg))
  out = {}
  for scan_layers in (False, True):
    directory = str(tmp_path / f'scan_{scan_layers}')
    convert_lib.convert(str(tmp_path / 'tiny.json'), str(tmp_path / 'tiny.pt'), directory,
                        tokenizer=helpers.MERGES, scan_layers=scan_layers)
    ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
    out[scan_layers] = (directory, ckpt.restore_config(0), ckpt.restore_params(0))
  (_, plain_config, plain), (directory, config, stacked) = out[False], out[True]
  assert not plain_config.model.image.scan_layers and not plain_config.model.text.scan_layers
  assert config.model.image.scan_layers and config.model.text.scan_layers
  assert 'block00' in plain['image']['encoder'] and 'block00' not in stacked['image']['encoder']
  want = scan.to_layout(plain, stacked)
  assert jax.tree.structure(want) == jax.tree.structure(stacked)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want),
                                                  jax.tree.leaves(stacked)))
  diffs = helpers._differences(directory, model, 32, seed=0)  # pylint: disable=protected-access
  assert max(diffs.values()) <= helpers.TOLERANCE, diffs


@pytest.mark.parametrize('source_scan, target_scan', [(False, True), (True, False)])
def test_init_from_converts_the_checkpoint_layout(tmp_path, source_scan, target_scan):
  """config.init_from a checkpoint of the other layout: basic.train.params_from_checkpoint stacks
  (or unstacks) the blocks, exactly."""
  from basic import checkpoint as checkpoint_lib
  from basic import train
  from basic.models import build as build_model

  def state_of(scan_layers):
    config = tiny.get_config()
    config.model.image.scan_layers = config.model.text.scan_layers = scan_layers
    model = build_model(config)
    tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    return config, train.create_train_state(config, model, tx, mesh)[0]

  config, source = state_of(source_scan)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(1, source, config)
  ckpt.wait()
  ckpt.close()
  _, target = state_of(target_scan)
  loaded = train.params_from_checkpoint(str(tmp_path), target.params)
  expected = scan.to_layout(jax.device_get(source.params), jax.device_get(target.params))
  assert ('block_scan' in loaded['image']['encoder']) == target_scan
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(loaded) == jax.tree.structure(target.params)
