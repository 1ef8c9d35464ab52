"""Tower shapes, parameter counts, pooling and masking semantics of the models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic.models import build as build_model
from basic.models import temperature_from_params
from basic.models import text as text_lib
from basic.models import vit
from configs import tiny


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_shapes_and_param_count():
  model = vit.ViT(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
  x = jnp.zeros((3, 16, 16, 3))
  params = model.init(jax.random.key(0), x)['params']
  assert model.apply({'params': params}, x).shape == (3, 32)
  # Patch embedding 4*4*3*32+32, pos 16*32, per block: 2 LN (4*32), qkv+out (4*32*32+4*32),
  # MLP (32*64+64+64*32+32); final LN 2*32.
  per_block = 4 * 32 + 4 * 32 * 32 + 4 * 32 + 32 * 64 + 64 + 64 * 32 + 32
  expected = (4 * 4 * 3 * 32 + 32) + 16 * 32 + 2 * per_block + 2 * 32
  assert _count(params) == expected


def test_vit_cls_pool_and_sincos():
  model = vit.ViT(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, pool='cls',
                  posemb='sincos2d')
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)['params']
  assert 'pos_embedding' not in params and params['cls'].shape == (1, 1, 16)
  assert model.apply({'params': params}, x).shape == (2, 16)


def test_vit_clip_layout_ln_pre_and_no_patch_bias():
  """CLIP's layout (basic.convert.open_clip): LayerNorm before the Transformer, no patch bias."""
  kwargs = dict(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, pool='cls')
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = vit.ViT(**kwargs)
  clip = vit.ViT(**kwargs, ln_pre=True, patch_bias=False, activation='quick_gelu', norm_eps=1e-5)
  p_plain = plain.init(jax.random.key(0), x)['params']
  p_clip = clip.init(jax.random.key(0), x)['params']
  assert 'bias' in p_plain['embedding'] and 'bias' not in p_clip['embedding']
  assert 'ln_pre' not in p_plain and p_clip['ln_pre']['scale'].shape == (16,)
  assert _count(p_clip) == _count(p_plain) - 16 + 2 * 16
  # ln_pre normalises every token: scaling the patch embedding (and the class token and position
  # embedding with it) leaves the output unchanged, up to the LayerNorm epsilon.
  scaled = dict(p_clip, embedding={'kernel': 10 * p_clip['embedding']['kernel']},
                cls=10 * p_clip['cls'], pos_embedding=10 * p_clip['pos_embedding'])
  np.testing.assert_allclose(clip.apply({'params': scaled}, x),
                             clip.apply({'params': p_clip}, x), rtol=1e-3, atol=1e-4)


def test_text_mask_padding_off_attends_to_id_0():
  """mask_padding=False (CLIP's BPE: id 0 is '!'): a 0 inside the caption is attended to; with
  causal attention and argmax pooling, whatever follows the EOT changes nothing."""
  kwargs = dict(vocab_size=50, width=16, depth=1, num_heads=2, mlp_dim=32, causal=True,
                pool='argmax')
  clip = text_lib.TextTransformer(**kwargs, mask_padding=False)
  masked = text_lib.TextTransformer(**kwargs)
  tokens = jnp.array([[48, 5, 0, 6, 49, 0, 0]], jnp.int32)   # SOT, 'a', '!', 'b', EOT, pad.
  params = clip.init(jax.random.key(0), tokens)['params']
  out = clip.apply({'params': params}, tokens)
  assert not np.allclose(out, masked.apply({'params': params}, tokens), atol=1e-4)
  after_eot = tokens.at[0, 5:].set(7)
  np.testing.assert_allclose(clip.apply({'params': params}, after_eot), out, rtol=1e-6,
                             atol=1e-6)


def test_text_tower_shapes_and_padding_invariance():
  model = text_lib.TextTransformer(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64,
                                   pool='mean')
  tokens = jnp.array([[5, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0]], jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  out = model.apply({'params': params}, tokens)
  assert out.shape == (2, 32)
  # Changing the content after the padding start must not change pooled features: padding is
  # neither attended to nor pooled. (Token ids at padded positions are 0 by definition, so we
  # compare against a longer-padded twin of the same caption with one different real token.)
  other = tokens.at[1, 0].set(10)
  out2 = model.apply({'params': params}, other)
  np.testing.assert_allclose(out[0], out2[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[1], out2[1])


@pytest.mark.parametrize('pool', ['eos', 'first'])
def test_text_causal_pooling(pool):
  model = text_lib.TextTransformer(vocab_size=50, width=16, depth=1, num_heads=2, mlp_dim=32,
                                   causal=True, pool=pool)
  tokens = jnp.array([[5, 6, 7, 3, 0, 0]], jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  out = model.apply({'params': params}, tokens)
  # Causal: changing a token after position p does not change the output at p.
  changed = tokens.at[0, 2].set(8)
  out2 = model.apply({'params': params}, changed)
  if pool == 'first':
    np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-6)
  else:
    assert not np.allclose(out, out2)


def test_dual_encoder_tiny_config():
  config = tiny.get_config()
  model = build_model(config)
  images = jnp.zeros((4, 32, 32, 3), jnp.uint8)
  tokens = jnp.ones((4, config.data.text_length), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)['params']
  zi, zt = model.apply({'params': params}, images, tokens)
  assert zi.shape == zt.shape == (4, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(zi, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(zt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(temperature_from_params(params, config)),
                             config.model.temperature_init, rtol=1e-6)
  assert set(params) == {'image', 'text', 'image_proj', 'text_proj', 'log_temperature'}
  # The tiny default stays tiny: 0.43M parameters.
  assert _count(params) == 432769


def test_temperature_clipped():
  config = tiny.get_config()
  t = temperature_from_params({'log_temperature': jnp.array(np.log(1e-4))}, config)
  np.testing.assert_allclose(float(t), config.model.temperature_min, rtol=1e-6)
