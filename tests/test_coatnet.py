"""CoAtNet image tower: sizes against the CoAtNet paper, semantics, exact gradient caching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import gradcache
from basic import train
from basic.models import build as build_model
from basic.models import coatnet
from configs import basic_s
import tower_helpers


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Published sizes: CoAtNet paper (Dai et al. 2021, arXiv 2106.04803), 0-4 ImageNet classifiers,
# 5-7 the JFT models. They count the classifier; the head added here is the one of timm's
# paper-matching configs (timm/models/maxxvit.py coatnet_0..5, `head_hidden_size` = D4): a
# pre-logits Linear(D4, D4) + tanh, then the 1000-way layer. With it 0-5 and 7 land within 0.6%.
_COATNET_6 = ('CoAtNet-6 with the stage table as read here (S3 = 8 MBConv at 768 + 42 Transformer '
              'blocks at 1536, S4 = 2 x 2048) counts 1.348B, -8.3% from the published 1.47B; the '
              'same design with S4 = 3072 (as CoAtNet-7) counts 1.471B (+0.1%), so the published '
              'count and the stage table disagree; the paper text could not be consulted to settle '
              'it, and CoAtNet-6 is used by no config here')
PUBLISHED = [
    ('coatnet-0', 25e6), ('coatnet-1', 42e6), ('coatnet-2', 75e6), ('coatnet-3', 168e6),
    ('coatnet-4', 275e6), ('coatnet-5', 688e6),
    pytest.param('coatnet-6', 1470e6, marks=pytest.mark.xfail(strict=True, reason=_COATNET_6)),
    ('coatnet-7', 2440e6),
]


def classifier_params(width, classes=1000):
  """The classifier the published CoAtNet sizes include: pre-logits D x D + tanh, then classes."""
  return width * width + width + width * classes + classes


def _tower_params(variant, size=224):
  spec = coatnet.variant_spec(variant)
  model = coatnet.CoAtNet(**spec)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)['params'], spec


@pytest.mark.parametrize('variant,published', PUBLISHED)
def test_param_count_matches_paper(variant, published):
  params, spec = _tower_params(variant)
  count = _count(params) + classifier_params(spec['dims'][-1])
  assert abs(count / published - 1) <= 0.02, (variant, count)


def test_relative_position_index():
  index = coatnet.relative_position_index(2, 3)   # Table of (2*2-1) x (2*3-1) = 15 offsets.
  assert index.shape == (6, 6) and index.min() == 0 and index.max() == 14
  assert (np.diag(index) == 7).all()              # Offset (0, 0) is the table's centre.
  # Query (0, 0) vs key (1, 2): offset (-1, -2) -> row 0, column 0.
  assert index[0, 5] == 0 and index[5, 0] == 14


def _small_config(drop_path=0.3, remat='none'):
  config = basic_s.get_config('runlocal=True')
  config.model.image.drop_path = drop_path
  config.model.image.remat = remat
  config.model.text.depth = 1
  config.model.text.dropout = 0.1
  return config


def test_forward_shapes_downsampling_and_drop_path():
  config = _small_config()
  model = build_model(config)
  batch = tower_helpers.random_batch(config, 4)
  params = tower_helpers.random_params(model, batch)
  tower = params['image']
  # Stage 3 block 0: 2x2 max-pool + 1x1 projection 32 -> 64 on the shortcut; relative tables
  # of (2H-1) x (2W-1) offsets per head at the 2x2 grid of stage 3 and the 1x1 grid of stage 4.
  assert tower['stage3_block00']['shortcut_proj']['kernel'].shape == (32, 64)
  assert tower['stage3_block00']['attn']['relative_bias'].shape == (3 * 3, 64 // 16)
  assert tower['stage4_block00']['attn']['relative_bias'].shape == (1 * 1, 96 // 16)
  run = jax.jit(lambda p, rng: model.apply({'params': p}, batch['image'], batch['text'],
                                           train=True, rngs={'dropout': rng})[0])
  first = run(params, jax.random.key(1))
  assert first.shape == (4, config.model.embed_dim)
  np.testing.assert_array_equal(first, run(params, jax.random.key(1)))  # Same masks.
  assert not np.allclose(first, run(params, jax.random.key(2)))         # Drop path is on.


def _relative_error(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = np.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b)))
  return num / np.sqrt(sum(float(jnp.sum(y ** 2)) for y in b))


def test_gradcache_step_equals_full_batch_with_drop_path_and_remat():
  config = _small_config(drop_path=0.3, remat='full')
  # One MBConv and one Transformer stage, both downsampling: half the program to compile.
  config.model.image.update(dict(depths=(1, 1), dims=(16, 32), block_types='CT',
                                 strides=(2, 2)))
  model = build_model(config)
  batch = tower_helpers.random_batch(config, 8)
  params = tower_helpers.random_params(model, batch)
  encode_fn, loss_fn = train.make_encode_fn(model), train.make_loss_fn(config)
  rng = jax.random.key(3)
  loss, grads = jax.jit(gradcache.value_and_grad(encode_fn, loss_fn, num_microbatches=2))(
      params, batch, rng)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(
      p, *gradcache.encode_full_batch(encode_fn, p, batch, rng, 2))))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert _relative_error(grads, ref_grads) <= 1e-5
  assert _relative_error(grads['image'], ref_grads['image']) <= 1e-5
  assert float(jnp.abs(grads['image']['stage1_block00']['depthwise']['kernel']).sum()) > 0
