r"""CLIPA token reduction throughput; not part of the test suite.

  python -m benchmarks.clipa [--clipa_repeats=10] [--out=BENCHMARKS.md]

Measures CLIPA token reduction on the tiny config's towers (configs/tiny.py), in one run: the
image tower alone (ViT forward + backward, pairs/s) and the whole train step (pairs/s) at full
tokens (32 px: 16 patch tokens; 16 text tokens), at half the image side (16 px: 4 tokens), with
50% and 75% random patch masking, with 8 text tokens, and with both reductions (16 px or 75%
masking, and 8 text tokens): all compiled first, then timed in --clipa_rounds interleaved rounds
of --clipa_repeats steps, each figure the fastest step of its case. With --out it replaces (or
appends) the section `## CLIPA token reduction` of that markdown file.
"""
import os

from absl import flags
import jax
import numpy as np

from basic import config_lib
from benchmarks import common
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_integer('clipa_batch_size', 256, 'Pairs per measured step.')
flags.DEFINE_integer('clipa_repeats', 10, 'Timed steps per case per round.')
flags.DEFINE_integer('clipa_rounds', 3, 'Interleaved timing rounds over all cases.')

MODULE = 'benchmarks.clipa'

CLIPA_CASES = (  # name, image size, image mask (kind, ratio), text length.
    ('full tokens (32 px, 16 text)', 32, ('none', 0.0), 16),
    ('half image side (16 px: 4x fewer image tokens)', 16, ('none', 0.0), 16),
    ('random masking 50%', 32, ('random', 0.5), 16),
    ('random masking 75%', 32, ('random', 0.75), 16),
    ('text 8 tokens', 32, ('none', 0.0), 8),
    ('16 px + text 8 tokens', 16, ('none', 0.0), 8),
    ('random masking 75% + text 8 tokens', 32, ('random', 0.75), 8),
)


def _clipa_config(size, mask, length, batch_size):
  """configs/tiny.py at one case's image size, image mask and text length."""
  config = tiny.get_config()
  config.batch_size = config.microbatch_size = batch_size
  config.data.image_size, config.data.text_length = size, length
  config.model.image.mask.kind, config.model.image.mask.ratio = mask
  config_lib.validate(config)
  return config


def _image_tower_timer(config):
  """Timer of the ViT image tower alone: forward + backward of its pooled features."""
  from basic.models import vit  # pylint: disable=g-import-not-at-top
  c = config.model.image
  model = vit.ViT(patch_size=c.patch_size, width=c.width, depth=c.depth, num_heads=c.num_heads,
                  mlp_dim=c.mlp_dim, pool=c.pool,
                  mask=dict(kind=c.mask.kind, ratio=c.mask.ratio, cell=c.mask.cell))
  n, size = config.batch_size, config.data.image_size
  images = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), images[:1])['params']

  @jax.jit
  def step(p, x, rng):
    loss = lambda q: model.apply({'params': q}, x, train=True, rngs={'dropout': rng}).sum()
    return jax.grad(loss)(p)

  return common.step_timer(step, (params, images), jax.random.key(1))


def _mask_is_wired(config, model, state, batch):
  """Whether the DualEncoder's image tower applies config.model.image.mask in training."""
  _, out = model.apply({'params': state.params}, batch['image'][:2], batch['text'][:2],
                       train=True, rngs={'dropout': jax.random.key(0)},
                       mutable=['intermediates'])
  return 'kept' in out.get('intermediates', {}).get('image', {})


def _train_step_timer(config):
  """Timer of basic.train's whole train step, and whether the image mask was applied."""
  step, state, batch, rng, model = common.train_step(config, config.batch_size)
  wired = _mask_is_wired(config, model, state, batch)
  return common.step_timer(step, (state, batch), rng), wired


def clipa_bench(command):
  """Measures; -> the section `## CLIPA token reduction`."""
  n, repeats, rounds = FLAGS.clipa_batch_size, FLAGS.clipa_repeats, FLAGS.clipa_rounds
  load_before = common.load_average()
  timers = []   # Every case compiled first: (name, image timer or None, step timer, applied).
  for name, size, mask, length in CLIPA_CASES:
    config = _clipa_config(size, mask, length, n)
    image = _image_tower_timer(config) if length == 16 else None
    step, wired = _train_step_timer(config)
    timers.append((name, image, step, wired or mask[0] == 'none'))
  # Then timed in interleaved rounds, so that a burst of load from other jobs hits every case
  # alike; per case the fastest step of all rounds, and for the baseline each round's fastest.
  best = {}
  baseline_rounds = []
  for r in range(rounds):
    for name, image, step, _ in timers:
      for kind, timer in (('image', image), ('step', step)):
        if timer is not None:
          fastest = min(timer(r * repeats + i) for i in range(repeats))
          best[name, kind] = min(best.get((name, kind), fastest), fastest)
          if name == CLIPA_CASES[0][0] and kind == 'step':
            baseline_rounds.append(n / fastest)
    print(f'round {r + 1} of {rounds} done; load average {common.load_average()}', flush=True)
  rows = [(name, n / best[name, 'image'] if image else None, n / best[name, 'step'], applied)
          for name, image, _, applied in timers]
  for row in rows:
    print(row)
  return clipa_section(command, rows, baseline_rounds, load_before, common.load_average())


def clipa_section(command, rows, baseline_rounds, load_before, load_after):
  """The markdown section of `clipa_bench`'s rows (name, image pairs/s, step pairs/s, applied);
  the first row is the baseline of the ratios; baseline_rounds: its train step pairs/s per
  round."""
  n, repeats, rounds = FLAGS.clipa_batch_size, FLAGS.clipa_repeats, FLAGS.clipa_rounds
  base_image, base_step = rows[0][1], rows[0][2]
  gain = {name: (image_rate / base_image if image_rate else None, step_rate / base_step)
          for name, image_rate, step_rate, _ in rows}
  half, mask75, text8, both = (gain[CLIPA_CASES[i][0]] for i in (1, 3, 4, 5))
  lines = ['## CLIPA token reduction', '',
           f'`{command}`{common.niceness()} on {jax.devices()[0].platform.upper()} '
           f'({os.cpu_count()} cores), '
           f'configs/tiny.py towers, batch {n}. Every case is compiled first, then timed in '
           f'{rounds} interleaved rounds of {repeats} steps (so a burst of load from other jobs '
           'hits all cases alike); each figure is the fastest step of its case (other jobs only '
           'ever slow a step down, so the fastest is the closest to this machine\'s own speed). '
           'Image tower: ViT forward + backward alone (basic/models/vit.py with '
           '`mask`/`mask_ratio`); train step: basic.train\'s whole step (both towers, loss, '
           'AdamW; the DualEncoder applies `config.model.image.mask`, checked per row).', '',
           f'Machine load (1 / 5 / 15-min load average, 2 cores): {load_before} before, '
           f'{load_after} after; the machine is shared (CI runs and other jobs), so absolute '
           'rates are lower bounds and the ratios move with the load too: the full-token train '
           'step\'s fastest step per round gave '
           + ', '.join(f'{x:,.0f}' for x in baseline_rounds) + ' pairs/s.', '',
           '| case | image tower pairs/s | x full | train step pairs/s | x full |',
           '| --- | ---: | ---: | ---: | ---: |']
  for name, image_rate, step_rate, applied in rows:
    image = (f'{image_rate:,.0f} | {image_rate / base_image:.2f}' if image_rate else '- | -')
    note = '' if applied else ' (mask not applied by the DualEncoder: not wired yet)'
    lines.append(f'| {name}{note} | {image} | {step_rate:,.0f} | {step_rate / base_step:.2f} |')
  lines += [
      '',
      f'- Image tower (target >= 3x): 4x fewer image tokens give {half[0]:.1f}x its throughput '
      f'at half the side and {mask75[0]:.1f}x with 75% random masking (there the patch embedding '
      'still runs on all 16 patches, and the gather adds a step).',
      f'- Whole train step: {half[1]:.2f}x at 16 px, {mask75[1]:.2f}x with 75% masking, '
      f'{text8[1]:.2f}x with 8 text tokens, {both[1]:.2f}x with 16 px and 8 text tokens (the '
      'pre-training tokens of `clipa_schedule` below): the text tower, the loss and the AdamW '
      'update do not shrink with the image tokens.',
  ]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, clipa_bench)
