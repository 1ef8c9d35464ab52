"""Tests for basic.models.posemb: position embeddings carried across image grids and lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic.models import dual_encoder
from basic.models import posemb
from basic.models import vit
from configs import tiny


def _table(t, d=8, seed=0):
  return np.random.default_rng(seed).normal(size=(1, t, d)).astype(np.float32)


@pytest.mark.parametrize('src,dst', [(4, 2), (4, 7), (3, 6), (6, 4)])
def test_image_table_is_bilinear_over_the_grid(src, dst):
  table = _table(src * src)
  out = posemb.resize_position_embedding(table, (1, dst * dst, 8), 'image/pos_embedding')
  ref = jax.image.resize(jnp.asarray(table[0].reshape(src, src, 8), jnp.float32),
                         (dst, dst, 8), 'linear', antialias=False)
  assert out.shape == (1, dst * dst, 8) and out.dtype == np.float32
  np.testing.assert_allclose(out[0].reshape(dst, dst, 8), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('src,dst', [(16, 8), (8, 16), (5, 12)])
def test_text_table_is_linear_over_length(src, dst):
  table = _table(src, seed=1)
  out = posemb.resize_position_embedding(table, (1, dst, 8), 'text/pos_embedding')
  # NumPy reference: np.interp at half-pixel centres (edges clamped), per feature.
  x = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
  ref = np.stack([np.interp(x, np.arange(src), table[0, :, i]) for i in range(8)], axis=1)
  np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-6)


def test_text_2_to_4_by_hand():
  table = np.array([[[0.], [4.]]], np.float32)
  out = posemb.resize_position_embedding(table, (1, 4, 1), 'text/pos_embedding')
  np.testing.assert_allclose(out[0, :, 0], [0., 1., 3., 4.])


def test_other_shape_changes_raise_naming_the_parameter():
  with pytest.raises(ValueError, match='image/pos_embedding'):
    posemb.resize_position_embedding(_table(16), (1, 8, 8), 'image/pos_embedding')  # Not square.
  with pytest.raises(ValueError, match='text/pos_embedding'):
    posemb.resize_position_embedding(_table(16), (1, 16, 4), 'text/pos_embedding')  # Width.
  with pytest.raises(ValueError, match='other/pos_embedding'):
    posemb.resize_position_embedding(_table(16), (1, 4, 8), 'other/pos_embedding')


def _init(config):
  model = dual_encoder.build(config)
  size, length = config.data.image_size, config.data.text_length
  return model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8),
                    jnp.ones((1, length), jnp.int32))['params']


def test_adapt_params_resizes_learned_tables_on_load():
  small = tiny.get_config()
  small.data.image_size, small.data.text_length = 16, 8       # 2x2 patches, 8 tokens.
  loaded = _init(small)
  target = _init(tiny.get_config())                             # 4x4 patches, 16 tokens.
  out = posemb.adapt_params(loaded, target)
  assert out['image']['pos_embedding'].shape == (1, 16, 96)
  assert out['text']['pos_embedding'].shape == (1, 16, 96)
  ref = jax.image.resize(jnp.asarray(loaded['image']['pos_embedding'][0]).reshape(2, 2, 96),
                         (4, 4, 96), 'linear', antialias=False)
  np.testing.assert_allclose(out['image']['pos_embedding'][0].reshape(4, 4, 96), ref,
                             rtol=1e-5, atol=1e-6)
  ref = jax.image.resize(jnp.asarray(loaded['text']['pos_embedding'][0]), (16, 96), 'linear',
                         antialias=False)
  np.testing.assert_allclose(out['text']['pos_embedding'][0], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out['image']['encoder']['ln_final']['scale'],
                                loaded['image']['encoder']['ln_final']['scale'])


def test_sincos_vit_runs_at_any_resolution_with_the_same_params():
  model = vit.ViT(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, posemb='sincos2d')
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert 'pos_embedding' not in params                       # Nothing to resize.
  for size in (8, 16, 32):
    out = model.apply({'params': params}, jnp.ones((2, size, size, 3)))
    assert out.shape == (2, 16) and np.isfinite(out).all()
  # Its table is the 2-D sin-cos of the grid: row-major positions, [sin x, cos x, sin y, cos y].
  table = np.asarray(vit.sincos_2d(2, 3, 8))
  np.testing.assert_allclose(table[0, 4], [np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4),
                                           np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4)],
                             rtol=1e-6)
