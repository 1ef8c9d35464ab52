"""CLIPA-v2 token reduction: ViT patch masking, text masking, stages (basic/models/vit.py, ...)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basic import contrastive
from basic import gradcache
from basic.models import transformer
from basic.models import vit

GRID = 4            # 4 x 4 = 16 patch tokens of 4 px on 16 px images.
PATCH = 4
WIDTH = 32


def make_vit(mask='random', ratio=0.5, pool='gap', cell=2):
  return vit.ViT(patch_size=PATCH, width=WIDTH, depth=2, num_heads=2, mlp_dim=64, pool=pool,
                 mask=dict(kind=mask, ratio=ratio, cell=cell))


def images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, GRID * PATCH, GRID * PATCH, 3)),
                     jnp.float32)


@functools.lru_cache(maxsize=None)
def vit_params(pool):
  return make_vit(pool=pool).init(jax.random.key(0), images(1))['params']


@pytest.mark.parametrize('kind', ['random', 'grid', 'block'])
@pytest.mark.parametrize('ratio', [0.25, 0.5, 0.75, 0.9])
def test_mask_keeps_round_1_minus_r_t_tokens_per_example(kind, ratio):
  t = GRID * GRID
  keep = np.asarray(vit.mask_indices(jax.random.key(1), 64, GRID, GRID, kind, ratio))
  k = round((1 - ratio) * t)
  assert keep.shape == (64, k)
  for row in keep:
    assert len(set(row.tolist())) == k                 # Distinct positions ...
    assert (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < t   # ... ascending.
  # A different set per example (block: whole 2x2 cells, only a few distinct sets), reproducible
  # from the rng.
  assert len({tuple(r) for r in keep.tolist()}) > (2 if kind == 'block' else 32)
  again = np.asarray(vit.mask_indices(jax.random.key(1), 64, GRID, GRID, kind, ratio))
  np.testing.assert_array_equal(keep, again)
  other = np.asarray(vit.mask_indices(jax.random.key(2), 64, GRID, GRID, kind, ratio))
  assert (keep != other).any()


def test_grid_mask_keeps_one_token_per_2x2_cell():
  keep = np.asarray(vit.mask_indices(jax.random.key(3), 16, GRID, GRID, 'grid', 0.75))
  cells = (keep // GRID // 2) * 2 + (keep % GRID) // 2
  for row in cells:
    assert sorted(row.tolist()) == [0, 1, 2, 3]


def test_block_mask_drops_whole_cells():
  keep = np.asarray(vit.mask_indices(jax.random.key(4), 16, GRID, GRID, 'block', 0.5))
  cells = (keep // GRID // 2) * 2 + (keep % GRID) // 2
  for row in cells:      # 8 kept of 16 = exactly two whole 2x2 cells.
    assert sorted(np.bincount(row, minlength=4).tolist()) == [0, 0, 4, 4]


def _forward_on_kept_tokens(params, x, keep, pool):
  """Reference: embedding + position, gather `keep`, encoder called directly, pool."""
  p = params
  tok = jax.lax.conv_general_dilated(x, p['embedding']['kernel'], (PATCH, PATCH), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  tok = tok + p['embedding']['bias']
  b = tok.shape[0]
  tok = tok.reshape(b, -1, WIDTH) + p['pos_embedding']
  tok = jnp.stack([tok[i, keep[i]] for i in range(b)])        # Only the kept tokens.
  if pool == 'cls':
    tok = jnp.concatenate([jnp.tile(p['cls'], (b, 1, 1)), tok], axis=1)
  enc = transformer.Encoder(2, 2, 64)
  out = enc.apply({'params': p['encoder']}, tok)
  return out[:, 0] if pool == 'cls' else out.mean(axis=1)


@pytest.mark.parametrize('pool', ['gap', 'cls'])
def test_masked_forward_equals_forward_on_the_kept_tokens(pool):
  params, x = vit_params(pool), images(6, seed=1)
  model = make_vit(pool=pool, ratio=0.5)
  out, state = model.apply({'params': params}, x, train=True,
                           rngs={'dropout': jax.random.key(5)}, mutable=['intermediates'])
  keep = np.asarray(state['intermediates']['kept'][0])
  assert keep.shape == (6, 8)
  ref = _forward_on_kept_tokens(params, x, keep, pool)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Evaluation sees every token: equal to the model without masking.
  full = make_vit(mask='none', pool=pool).apply({'params': params}, x, train=False)
  np.testing.assert_allclose(model.apply({'params': params}, x, train=False), full, rtol=1e-6)
  assert np.abs(np.asarray(out) - np.asarray(full)).max() > 1e-4   # Masking did change it.


class _MaskedDual(nn.Module):
  """A masked ViT image tower and an embedding-bag text tower, unit vectors of 16."""

  @nn.compact
  def __call__(self, batch):
    self.param('log_temperature', lambda _: jnp.log(jnp.float32(0.07)))
    img = make_vit(mask='random', ratio=0.5)(batch['image'], train=True)
    img = nn.Dense(16)(img)
    txt = nn.Dense(16)(nn.Embed(50, 16)(batch['text']).mean(axis=1))
    return (img / jnp.linalg.norm(img, axis=-1, keepdims=True),
            txt / jnp.linalg.norm(txt, axis=-1, keepdims=True))


def test_gradcache_with_masking_equals_full_batch_gradient():
  model = _MaskedDual()
  rng = np.random.default_rng(0)
  batch = {'image': images(16, seed=2),
           'text': jnp.asarray(rng.integers(0, 50, size=(16, 5)), jnp.int32)}
  params = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                      batch)['params']

  def encode_fn(p, b, r):
    return model.apply({'params': p}, b, rngs={'dropout': r})

  def loss_fn(p, image_emb, text_emb):
    return contrastive.softmax_loss(image_emb, text_emb, jnp.exp(p['log_temperature']))

  step_rng = jax.random.key(7)
  loss, grads = jax.jit(gradcache.value_and_grad(encode_fn, loss_fn, num_microbatches=4))(
      params, batch, step_rng)

  def full(p):
    return loss_fn(p, *gradcache.encode_full_batch(encode_fn, p, batch, step_rng, 4))

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(full))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  g, r = flat(grads), flat(ref_grads)
  # Relative to the whole gradient (some leaves, e.g. biases before a LayerNorm, are ~0).
  assert np.linalg.norm(g - r) <= 1e-5 * np.linalg.norm(r)
  assert np.linalg.norm(r) > 0
  # The masks differ between microbatch rngs, so the masked loss differs from an unmasked one.
  unmasked = model.apply({'params': params}, batch, rngs={'dropout': step_rng})
  assert np.isfinite(loss) and unmasked[0].shape == (16, 16)


# Text token reduction (basic/data/text_mask.py).

SENTENCE = 'a photo of the red dog on a green sofa'
SEED = (0, 7)


def _mask(captions, kind, length, seed=SEED):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from basic.data import text_mask  # pylint: disable=g-import-not-at-top
  out = text_mask.mask_captions(tf.constant(captions), kind, length,
                                tf.constant(seed, tf.int64))
  return [c.decode() for c in out.numpy()]


def test_text_truncate_and_none():
  assert _mask([SENTENCE, 'one two'], 'truncate', 4) == ['a photo of the', 'one two']
  assert _mask([SENTENCE], 'none', 4) == [SENTENCE]


def test_text_syntax_approximation_keeps_content_words_first_in_order():
  assert _mask([SENTENCE], 'syntax', 5) == ['photo red dog green sofa']
  assert _mask([SENTENCE], 'syntax', 7) == ['a photo of red dog green sofa']
  assert _mask(['The Dog, with a hat.'], 'syntax', 2) == ['Dog, hat.']


def test_text_random_keeps_length_words_in_order_per_caption_reproducibly():
  words = SENTENCE.split()
  out = _mask([SENTENCE] * 32, 'random', 4)
  for caption in out:
    kept = caption.split()
    assert len(kept) == 4
    idx = [words.index(w) if w != 'a' else None for w in kept]
    idx = [i for i in idx if i is not None]
    assert idx == sorted(idx)                   # Original order.
  assert len(set(out)) > 8                      # A different choice per caption ...
  assert _mask([SENTENCE] * 32, 'random', 4) == out          # ... a function of the seed.
  assert _mask([SENTENCE] * 32, 'random', 4, seed=(0, 8)) != out
  assert _mask(['one two'], 'random', 4) == ['one two']       # Short captions whole.


def test_text_block_keeps_consecutive_words():
  out = _mask([SENTENCE] * 32, 'block', 3)
  spans = {' '.join(SENTENCE.split()[i:i + 3]) for i in range(8)}
  assert set(out) <= spans and len(set(out)) > 3
  assert _mask(['a b'], 'block', 3) == ['a b']


def test_pipeline_applies_the_text_mask(tmp_path):
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.batch_size = 8
  config.data.text_length = 16
  path = tokenizer_lib.ensure_tokenizer(config, str(tmp_path))
  tok = tokenizer_lib.Tokenizer.from_config(config.tokenizer, path, 16)
  plain = next(pipeline.make_train_iterator(config, tok))['text']
  config.data.text_mask.kind, config.data.text_mask.length = 'truncate', 2
  cut = next(pipeline.make_train_iterator(config, tok))['text']
  captions = tok.decode(plain)
  ref = tok.encode([' '.join(c.split()[:2]) for c in captions])
  np.testing.assert_array_equal(cut, ref)
  assert (cut != plain).any()


# Stages: configs/clipa_v2_h14.py, reduced tokens then full tokens from the first's checkpoint.


def _stage(arg, **overrides):
  from configs import clipa_v2_h14  # pylint: disable=g-import-not-at-top
  config = clipa_v2_h14.get_config(arg)
  config.batch_size, config.microbatch_size = 16, 8
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.eval.zeroshot = False
  config.tokenizer.train_sentences = 2000
  config.update_from_flattened_dict(overrides)
  return config


def test_clipa_v2_h14_stage_numbers():
  from configs import clipa_v2_h14  # pylint: disable=g-import-not-at-top
  pre = clipa_v2_h14.get_config('stage=pretrain84')
  assert (pre.data.image_size, pre.data.text_length, pre.batch_size) == (84, 8, 65536)
  assert pre.optimizer.learning_rate == pytest.approx(2.048e-3)
  assert pre.total_steps * pre.batch_size == pytest.approx(12.8e9, rel=0.01)
  assert pre.data.text_mask.kind == 'syntax' and pre.model.image.mask.kind == 'none'
  tune = clipa_v2_h14.get_config('stage=tune224,init_from=/w84')
  assert (tune.data.image_size, tune.data.text_length, tune.init_from) == (224, 32, '/w84')
  assert tune.model.image.mask.ratio == 0.3 and tune.total_steps == 16000
  with pytest.raises(ValueError, match='stage'):
    clipa_v2_h14.get_config('stage=tune999')


def test_two_stage_tiny_run_second_starts_from_the_first(tmp_path):
  from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from basic import train  # pylint: disable=g-import-not-at-top
  from basic.models import posemb  # pylint: disable=g-import-not-at-top
  first, second = str(tmp_path / 'pretrain'), str(tmp_path / 'tune')
  stage1 = _stage('stage=pretrain84,runlocal')
  assert (stage1.data.image_size, stage1.data.text_length) == (16, 8)    # Reduced tokens.
  train.train_and_evaluate(stage1, first)
  trained = checkpoint_lib.Checkpointer(f'{first}/checkpoints', read_only=True).restore_params(2)
  stage2 = _stage(f'stage=tune224,runlocal,init_from={first}', total_steps=1)
  stage2.tokenizer.model_path = f'{first}/tokenizer/spm.model'   # The same tokenizer.
  assert (stage2.data.image_size, stage2.data.text_length) == (32, 16)   # Full tokens.
  stage2.optimizer.learning_rate = 1e-20      # One step that moves nothing measurably.
  train.train_and_evaluate(stage2, second)
  after = checkpoint_lib.Checkpointer(f'{second}/checkpoints', read_only=True).restore_params(1)
  assert after['text']['pos_embedding'].shape == (1, 16, 64)
  assert trained['text']['pos_embedding'].shape == (1, 8, 64)
  expected = posemb.adapt_params(trained, after)     # The 8 -> 16 text table interpolated.
  for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('stage', ['pretrain84', 'tune224', 'tune336'])
def test_clipa_v2_h14_stages_validate(stage):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  from configs import clipa_v2_h14  # pylint: disable=g-import-not-at-top
  config_lib.validate(clipa_v2_h14.get_config(f'stage={stage}'), num_data_devices=256)
  local = config_lib.validate(clipa_v2_h14.get_config(f'stage={stage},runlocal'))
  assert local.data.source == 'synthetic'
  bad = clipa_v2_h14.get_config(f'stage={stage}')
  bad.model.image.mask.ratio = 1.0
  with pytest.raises(ValueError, match='model.image.mask.ratio'):
    config_lib.validate(bad)


def test_clipa_schedule_step_counts_give_both_schedules_the_same_budget():
  from benchmarks import clipa_schedule  # pylint: disable=g-import-not-at-top
  full_s, reduced_s, budget = 0.83, 0.31, 240.0
  steps = clipa_schedule.allocate_steps(budget, full_s, reduced_s, pretrain_share=0.8)
  full = steps['full'] * full_s
  pretrain, tune = steps['pretrain'] * reduced_s, steps['tune'] * full_s
  assert abs(full - budget) <= full_s / 2                           # Within half a step each.
  assert abs(pretrain - 0.8 * budget) <= reduced_s / 2
  assert abs(tune - 0.2 * budget) <= full_s / 2
  assert abs((pretrain + tune) - full) <= full_s + reduced_s / 2
  assert steps['pretrain'] > steps['full'] > steps['tune'] >= 1
