r"""Locked image tower (LiT, config.lock_image): step time and image-tower passes; not a test.

  python -m benchmarks.lit [--lit_rounds=3] [--lit_repeats=3] [--out=BENCHMARKS.md]

For each image tower (configs/tiny.py's towers; a ViT-B/16 image tower at 64 px with the tiny
text tower), at N = --lit_batch_size pairs in K = --lit_microbatches microbatches, the real
train step (basic.train.make_train_step, gradcache_unroll 1) unlocked and with lock_image:

- step time: compiled first, then --lit_rounds interleaved rounds of --lit_repeats steps of each
  case; each figure the fastest step;
- image-tower passes: the image patch-embedding convolutions of the step's jaxpr, each counted
  times the trip counts of the scans around it (a forward applies it once per microbatch, the
  backward once more for its kernel gradient): a locked step has K, an unlocked one 3K;
- FLOPs: the compiled step's loop-aware FLOPs (basic.flops.hlo_cost: `cost_analysis()` counts a
  loop body once), and the image tower's share: one forward of N images alone (F_img, compiled
  apart) for the locked step; F_img + (FLOPs(unlocked) - FLOPs(locked)) for the unlocked one
  (the text side and the loss are the same in both steps but for the image cotangent).

With --out it replaces (or appends) the section `## Locked image tower (LiT)` of that file.
"""
import os
import time

from absl import flags
import jax
import jax.numpy as jnp

from basic import config_defaults
from basic import config_lib
from basic import flops as flops_lib
from basic import freeze
from basic import models
from basic import optim
from basic import train
from benchmarks import common
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_integer('lit_batch_size', 64, 'N, pairs per step.')
flags.DEFINE_integer('lit_microbatches', 4, 'K, microbatches per step.')
flags.DEFINE_integer('lit_repeats', 3, 'Timed steps per case per round.')
flags.DEFINE_integer('lit_rounds', 3, 'Interleaved timing rounds over both cases.')

MODULE = 'benchmarks.lit'


def tiny_towers(batch_size, microbatches):
  """configs/tiny.py at N pairs in K microbatches."""
  config = tiny.get_config()
  config.batch_size, config.microbatch_size = batch_size, batch_size // microbatches
  return config


def vit_b16_64px(batch_size, microbatches):
  """A ViT-B/16 image tower (width 768, depth 12, 12 heads, MLP 3072) at 64 px (16 patches),
  the tiny text tower, embed_dim 512."""
  config = tiny_towers(batch_size, microbatches)
  config.data.image_size = 64
  config.model.embed_dim = 512
  config.model.image = config_defaults.tower(
      'vit', patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool='gap')
  config.sharding.rules = models.sharding_rules(config.model)
  return config


TOWERS = (('tiny (configs/tiny.py)', tiny_towers), ('ViT-B/16 image tower at 64 px', vit_b16_64px))


def count_primitive(jaxpr, name: str) -> int:
  """Applications of primitive `name` in a (closed) jaxpr, each scan body's counted times its
  length (nested jaxprs: pjit, remat, custom_vjp, cond branches all counted)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    times = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += times * count_primitive(sub, name)
  return total


def image_passes(config) -> int:
  """The image patch-embedding convolutions of one train step of `config` (count_primitive)."""
  model = models.build(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps, freeze.rules(config))
  state = jax.eval_shape(train.make_init_fn(config, model, tx))   # Abstract: nothing compiled.
  step = train.make_train_step(config, model, tx, schedule)
  batch = train.random_batch(config, config.batch_size)
  return count_primitive(jax.make_jaxpr(step)(state, batch, jax.random.key(0)),
                         'conv_general_dilated')


def _image_forward_flops(config, state) -> float:
  """Loop-aware FLOPs of encode_image on N images alone (one forward of the image tower)."""
  model = models.build(config)
  images = jnp.zeros((config.batch_size, config.data.image_size, config.data.image_size, 3),
                     jnp.uint8)
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_image')).lower(
      state.params, images).compile()
  return flops_lib.hlo_cost(compiled)['flops']


def measure(make_config, batch_size, microbatches, rounds, repeats) -> dict:
  """{'unlocked'|'locked': {'step_s', 'passes', 'flops'}, 'image_forward_flops'} of a tower."""
  cases = {}
  for name, lock in (('unlocked', False), ('locked', True)):
    config = make_config(batch_size, microbatches)
    config.lock_image = lock
    config_lib.validate(config)
    step, state, batch, rng, _ = common.train_step(config, batch_size)
    compiled = step.lower(state, batch, rng).compile()
    cases[name] = {'config': config, 'timer': common.step_timer(compiled, (state, batch), rng),
                   'flops': flops_lib.hlo_cost(compiled)['flops'],
                   'passes': image_passes(config), 'step_s': float('inf'), 'state': state}
  for r in range(rounds):
    for case in cases.values():
      for i in range(repeats):
        case['step_s'] = min(case['step_s'], case['timer'](r * repeats + i))
  out = {name: {k: case[k] for k in ('step_s', 'passes', 'flops')}
         for name, case in cases.items()}
  out['image_forward_flops'] = _image_forward_flops(cases['locked']['config'],
                                                    cases['locked']['state'])
  return out


def lit_section(command) -> str:
  n, k = FLAGS.lit_batch_size, FLAGS.lit_microbatches
  load_before = common.load_average()
  start = time.time()
  rows = []
  for title, make_config in TOWERS:
    r = measure(make_config, n, k, FLAGS.lit_rounds, FLAGS.lit_repeats)
    unlocked, locked = r['unlocked'], r['locked']
    f_img = r['image_forward_flops']
    img_unlocked = f_img + unlocked['flops'] - locked['flops']
    rows.append(
        f"| {title} | {unlocked['step_s'] * 1e3:.0f} | {locked['step_s'] * 1e3:.0f} | "
        f"{locked['step_s'] / unlocked['step_s']:.2f} | {unlocked['passes']} / "
        f"{locked['passes']} | {unlocked['flops'] / 1e9:.2f} / {locked['flops'] / 1e9:.2f} | "
        f'{img_unlocked / 1e9:.2f} / {f_img / 1e9:.2f} | {f_img / img_unlocked:.2f} |')
  return '\n'.join([
      '## Locked image tower (LiT)',
      '',
      f'`{command}` ({os.cpu_count()} CPU cores{common.niceness()}; load average '
      f'{load_before} before, {common.load_average()} after; {time.time() - start:.0f} s). '
      f'N = {n} pairs in K = {k} microbatches, the real train step (AdamW), unlocked vs '
      '`config.lock_image=True`; step time: fastest of '
      f'{FLAGS.lit_rounds} interleaved rounds of {FLAGS.lit_repeats} steps. Image passes: the '
      "image patch-embedding convolutions in the step's jaxpr times their scans' trip counts "
      '(forward: one per microbatch; backward: one more for the kernel gradient). Step GFLOPs: '
      'loop-aware (basic.flops.hlo_cost). Image GFLOPs: locked = one forward of N images '
      'compiled alone (F); unlocked = F + (step GFLOPs unlocked - locked).',
      '',
      '| image tower | unlocked ms | locked ms | locked / unlocked time | image passes '
      'unlocked / locked | step GFLOPs unlocked / locked | image GFLOPs unlocked / locked | '
      'image FLOPs locked / unlocked |',
      '|---|---|---|---|---|---|---|---|',
      *rows,
  ])


if __name__ == '__main__':
  common.run(MODULE, lit_section)
