"""ConvNeXt image tower and configs/convnext_xxlarge.py: sizes and MACs against OpenCLIP / timm,
semantics, exact gradient caching with stochastic depth, sharding coverage, a short local run."""
import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import pytest

from basic import config_lib
from basic import flops
from basic import gradcache
from basic import metric_writers
from basic import sharding
from basic import train
from basic.models import build as build_model
from basic.models import convnext
from basic.models import text as text_lib
from basic.plan import param_counts
from configs import convnext_xxlarge
import tower_helpers


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config, batch_size=1):
  batch = train.init_batch(config, batch_size)
  model = build_model(config)
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), b['image'], b['text']),
                        batch)['params']


@functools.lru_cache(maxsize=None)
def _xxlarge_params():
  """The recipe's parameter shapes (they do not depend on the compute dtype)."""
  return _abstract_params(convnext_xxlarge.get_config())


def test_xxlarge_param_counts_equal_open_clip():
  """OpenCLIP's own model, measured with open_clip_torch 3.3.0 and timm 1.0.31 (issue 11):
  visual 846,543,744; text (embeddings, transformer, ln_final, text_projection) 354,032,640;
  all 1,200,576,385 with the logit scale. Counted from shapes only (jax.eval_shape)."""
  counts = param_counts(_xxlarge_params())
  assert counts == {'params/image_tower': 846_543_744, 'params/text_tower': 354_032_640,
                    'params/total': 1_200_576_385}


def _macs(jaxpr):
  """Multiply-adds of the convolutions and matrix products of a jaxpr (fvcore's main terms)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      kernel = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec    # (out, in, *spatial) positions.
      per_output = kernel[spec[1]] * int(np.prod([kernel[i] for i in spec[2:]]))
      total += int(np.prod(eqn.outvars[0].aval.shape)) * per_output
    elif eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += _macs(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += _macs(sub)
  return total


# timm's published ImageNet classifiers: `results/results-imagenet.csv` (`param_count`,
# millions, 2 decimals, e.g. convnext_tiny.fb_in1k 28.59, convnext_xxlarge
# .clip_laion2b_soup_ft_in1k 846.47) and `results/benchmark-infer-amp-nchw-pt240-cu124-rtx3090
# .csv` (`infer_gmacs` at 224 px, fvcore: convolutions, matmuls and a few flops per LayerNorm
# element; xxlarge at 256 px, the card's 198.09).
TIMM = [  # (variant, params in M with a 1000-way head, image size, GMACs)
    ('convnext_atto', 3.70, 224, 0.55), ('convnext_femto', 5.22, 224, 0.79),
    ('convnext_pico', 9.05, 224, 1.37), ('convnext_nano', 15.59, 224, 2.46),
    ('convnext_tiny', 28.59, 224, 4.47), ('convnext_small', 50.22, 224, 8.71),
    ('convnext_base', 88.59, 224, 15.38), ('convnext_large', 197.77, 224, 34.4),
    ('convnext_xlarge', 350.20, 224, 60.98), ('convnext_xxlarge', 846.47, 256, 198.09),
]


@pytest.mark.parametrize('variant,params_m,size,gmacs', TIMM)
def test_trunk_params_and_macs_match_timm(variant, params_m, size, gmacs):
  """One trace of init (which runs the forward): parameter shapes and conv / matmul MACs.

  Our tower is timm's trunk without `head.fc`, so a 1000-way classifier (dims[-1] * 1000 +
  1000) is added: equal up to the rounding of the published count (+-0.005M). MACs of the
  convolutions and matrix products are within 2% of timm's GMACs (fvcore also counts norms).
  """
  spec = convnext.variant_spec(variant)
  model = convnext.ConvNeXt(**spec)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  traced, shapes = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x),
                                  return_shape=True)(images)
  count = _count(shapes['params']) + spec['dims'][-1] * 1000 + 1000
  assert abs(count - params_m * 1e6) <= 0.005e6, (variant, count)
  assert abs(_macs(traced.jaxpr) / 1e9 / gmacs - 1) <= 0.02, variant


def _xla_gmacs(config, method, inputs):
  """XLA's compiled cost of one tower forward at batch 1, loops counted by their trip counts
  (`basic.flops.hlo_cost`: the recipe scans its layers, and XLA's own cost analysis counts a
  scanned body once): flops / 2 (a MAC = 2 flops)."""
  model = build_model(config)
  params = _xxlarge_params()
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x, method=method)).lower(
      params, inputs).compile()
  cost = flops.hlo_cost(compiled)
  assert not cost['unresolved_loops'], cost
  return cost['flops'] / 2e9, cost['loops']


@pytest.mark.parametrize('tower,published', [('image', 198.09), ('text', 23.57)])
def test_xla_gmacs_match_the_card(tower, published):
  """Card table: convnext_xxlarge image_gmacs 198.09 (256 px), text_gmacs 23.57 (77 tokens).

  XLA counts every elementwise op too (LayerNorm, erf-GELU, softmax), so flops / 2 is a little
  above the card's counts: +1.26% (image, 200.58) and +1.05% (text, 23.82) in float32, the
  same with the layers scanned (the recipe) or unrolled (measured). The bf16 compute of
  the config adds f32<->bf16 converts on XLA:CPU (no bf16 matmul there), +2.0% and +2.9%;
  float32 measures the model's arithmetic, not the CPU's emulation of bf16.
  """
  config = convnext_xxlarge.get_config()
  config.model.dtype = 'float32'
  batch = train.init_batch(config, 1)
  if tower == 'image':
    gmacs, loops = _xla_gmacs(config, 'encode_image', jax.ShapeDtypeStruct(
        batch['image'].shape, jnp.uint8))
    # Stages of 3, 4, 30, 3 blocks: the blocks after each stage's first are scanned.
    assert config.model.image.scan_layers and sorted(t for _, t in loops) == [2, 2, 3, 29]
  else:
    gmacs, loops = _xla_gmacs(config, 'encode_text', jax.ShapeDtypeStruct(
        batch['text'].shape, jnp.int32))
    assert config.model.text.scan_layers and [t for _, t in loops] == [24]
  assert abs(gmacs / published - 1) <= 0.03, gmacs


def test_drop_path_rates_are_timm_linspace():
  np.testing.assert_allclose(convnext.drop_path_rates(0.1, (3, 4, 30, 3)),
                             np.linspace(0, 0.1, 40), rtol=1e-12, atol=1e-15)


def _small_config(drop_path=0.1, remat='none'):
  """The recipe's local twin cut to two stages (8x8 and 4x4 at 32 px): half the program."""
  config = convnext_xxlarge.get_config('runlocal=True')
  config.model.image.update(dict(depths=(1, 1), dims=(16, 32), drop_path=drop_path,
                                 remat=remat))
  config.model.text.depth = 1
  return config


def test_tower_shapes_and_names():
  config = convnext_xxlarge.get_config('runlocal=True')
  params = _abstract_params(config)
  tower = params['image']
  assert tower['stem_conv']['kernel'].shape == (4, 4, 3, 16)          # 4x4 patches, stride 4.
  assert tower['stage1_downsample_norm']['scale'].shape == (16,)     # LN, then 2x2 stride 2.
  assert tower['stage1_downsample_conv']['kernel'].shape == (2, 2, 16, 32)
  block = tower['stage3_block00']
  assert block['conv_dw']['kernel'].shape == (7, 7, 1, 64)            # Depthwise 7x7.
  assert block['mlp_fc1']['kernel'].shape == (64, 256)                # MLP ratio 4.
  assert block['gamma'].shape == (64,) and 'head_norm' in tower
  assert params['image_proj']['kernel'].shape == (64, config.model.embed_dim)
  assert 'bias' not in params['image_proj']                          # OpenCLIP proj_bias=False.
  assert 'stage0_downsample_conv' not in tower                        # Stage 0: no downsample.


def test_layer_scale_init_and_layernorm_head():
  block = convnext.ConvNeXtBlock()
  x = jnp.zeros((1, 4, 4, 8))
  gamma = jax.jit(lambda k: block.init(k, x, True))(jax.random.key(0))['params']['gamma']
  np.testing.assert_array_equal(gamma, np.full((8,), 1e-6, np.float32))   # timm ls_init_value.
  model = convnext.ConvNeXt(depths=(1, 1), dims=(8, 16), norm_eps=1e-6)
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), images)['params'])
  params['head_norm'] = {'scale': jnp.ones(16), 'bias': jnp.zeros(16)}
  out = jax.jit(model.apply)({'params': params}, rng.normal(size=images.shape))
  assert out.shape == (2, 16)
  # The head ends with a LayerNorm of the pooled features: zero mean, unit variance per image.
  np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(out.var(-1), 1, rtol=1e-3)


def test_text_argmax_pool_takes_the_highest_id():
  model = text_lib.TextTransformer(vocab_size=60, width=16, depth=1, num_heads=2, mlp_dim=32,
                                   causal=True, pool='argmax', activation='gelu', norm_eps=1e-5)
  tokens = jnp.array([[3, 7, 59, 0, 0], [3, 5, 8, 59, 0]], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  eos = text_lib.TextTransformer(vocab_size=60, width=16, depth=1, num_heads=2, mlp_dim=32,
                                 causal=True, pool='eos', activation='gelu', norm_eps=1e-5)
  by_argmax = jax.jit(lambda t: model.apply({'params': params}, t))
  by_eos = jax.jit(lambda t: eos.apply({'params': params}, t))
  # CLIP layout (EOT has the highest id, padding after it): argmax = the last non-pad token.
  np.testing.assert_allclose(by_argmax(tokens), by_eos(tokens), rtol=1e-6)
  # The highest id at position 1: what follows it cannot change the pooled (causal) features.
  early = jnp.array([[3, 59, 7, 8, 0], [3, 59, 9, 10, 11]], jnp.int32)
  pooled = by_argmax(early)
  np.testing.assert_allclose(pooled[0], pooled[1], rtol=1e-5, atol=1e-6)
  last = by_eos(early)
  assert not np.allclose(last[0], last[1])


def test_forward_drop_path_uses_the_dropout_rng():
  config = _small_config(drop_path=0.5)
  model = build_model(config)
  batch = tower_helpers.random_batch(config, 4)
  params = tower_helpers.random_params(model, batch)
  run = jax.jit(lambda p, rng: model.apply({'params': p}, batch['image'], batch['text'],
                                           train=True, rngs={'dropout': rng})[0])
  first = run(params, jax.random.key(1))
  assert first.shape == (4, config.model.embed_dim)
  np.testing.assert_array_equal(first, run(params, jax.random.key(1)))   # Same masks.
  assert not np.allclose(first, run(params, jax.random.key(2)))          # Drop path is on.


def _relative_error(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = np.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b)))
  return num / np.sqrt(sum(float(jnp.sum(y ** 2)) for y in b))


def test_gradcache_step_equals_full_batch_with_drop_path_and_remat():
  config = _small_config(drop_path=0.1, remat='full')
  model = build_model(config)
  batch = tower_helpers.random_batch(config, 8)
  params = tower_helpers.random_params(model, batch)
  encode_fn, loss_fn = train.make_encode_fn(model), train.make_loss_fn(config)
  rng = jax.random.key(3)
  # Stochastic depth is active in this step: the two microbatch rngs drop different blocks.
  encode = jax.jit(lambda k: encode_fn(params, batch, k)[0])
  assert not np.allclose(encode(jax.random.fold_in(rng, 0)), encode(jax.random.fold_in(rng, 1)))
  loss, grads = jax.jit(gradcache.value_and_grad(encode_fn, loss_fn, num_microbatches=2))(
      params, batch, rng)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(
      p, *gradcache.encode_full_batch(encode_fn, p, batch, rng, 2))))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert _relative_error(grads, ref_grads) <= 1e-5
  assert _relative_error(grads['image'], ref_grads['image']) <= 1e-5
  assert float(jnp.abs(grads['image']['stage0_block00']['conv_dw']['kernel']).sum()) > 0


def test_sharding_rules_cover_every_large_parameter():
  config = convnext_xxlarge.get_config()
  params = _xxlarge_params()
  rules = config.sharding.rules
  assert sharding.unmatched_params(params, rules, 2**16) == []
  mesh = jax.sharding.AbstractMesh((128, 2), ('data', 'model'))   # Rules also fit model=2.
  specs = sharding.param_partition_specs(params, rules, mesh, fsdp=config.sharding.fsdp,
                                         fsdp_min_size=config.sharding.fsdp_min_size)
  assert specs['image']['stage2_block00']['mlp_fc1']['kernel'] == jax.sharding.PartitionSpec(
      'data', 'model')


@pytest.mark.parametrize('arg,batch,microbatch,lr,scale,erasing', [
    ('', 81920, 20480, 1e-3, (0.33, 1.0), 0.35),
    ('rewind=True', 95744, 8704, 2e-3, (0.3, 1.0), 0.4),
])
def test_recipe_numbers(arg, batch, microbatch, lr, scale, erasing):
  config = convnext_xxlarge.get_config(arg)
  assert (config.batch_size, config.microbatch_size) == (batch, microbatch)
  assert config.optimizer.learning_rate == lr and config.optimizer.b2 == 0.98
  assert config.optimizer.warmup_steps == 10_000 and config.optimizer.grad_clip_norm == 5.0
  assert tuple(config.data.augment.crop_scale) == scale
  assert config.data.augment.erasing_prob == erasing
  assert config.model.image.drop_path == 0.1 and config.model.dtype == 'bfloat16'
  assert config.data.image_size == 256
  # OpenCLIP's steps per epoch (data.py) x 256 epochs; the core run sees 34.7B samples.
  assert config.total_steps == (364_032 if arg else 423_936)
  config_lib.validate(config, num_data_devices=256)


def test_image_size_validation_names_the_field():
  config = convnext_xxlarge.get_config('runlocal=True')
  config.data.image_size = 48
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.image_size=48'):
    config_lib.validate(config)


@pytest.mark.slow  # 32-37 s on an idle 2-core machine (init and train-step compiles).
def test_runlocal_trains_two_steps(tmp_path):
  config = convnext_xxlarge.get_config('runlocal=True')
  config.total_steps = 2
  config.log_every_steps = 1
  config.eval.zeroshot = False
  config.tokenizer.train_sentences = 2000
  train.train_and_evaluate(config, str(tmp_path))
  rows = metric_writers.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
