r"""CLIPA schedule vs full tokens at equal training time; not part of the test suite.

  python -m benchmarks.clipa_schedule [--clipa_budget_s=240] [--out=BENCHMARKS.md]

Compares, on the embedded default (configs/tiny.py: synthetic shapes, zero-shot top-1 on the 10
held-out colour x shape classes among all 48) and at the same training wall-clock budget
(--clipa_budget_s, compile excluded), the CLIPA schedule (pre-training on reduced tokens, then a
short full-token fine-tune from its checkpoint through `init_from`, with its own warmup and
cosine schedule) against the full-token schedule (the tiny run, shortened to the budget). It
first times a step of each configuration through basic.train itself and picks the CLIPA run's
steps from those times; the full-token run's steps then come from the CLIPA run's measured
training time (the load of a shared machine moves between runs). Every run goes through
`basic.train.train_and_evaluate` (workdirs in a temporary directory), scored by the final
held-out zero-shot top-1 of its evaluator. With --out it replaces (or appends) the section
`## CLIPA schedule vs full tokens at equal time`.
"""
import os
import statistics
import time

from absl import flags
import jax

from basic import config_lib
from basic import train
from benchmarks import common
from configs import tiny

FLAGS = flags.FLAGS
flags.DEFINE_float('clipa_budget_s', 240.0,
                   'Training seconds (compile excluded) of each schedule: the full-token run, '
                   'and pre-training + fine-tune of the CLIPA run.')
flags.DEFINE_float('clipa_pretrain_share', 0.8,
                   'Share of the budget spent on reduced-token pre-training; the fine-tune '
                   'gets the rest.')
# CHOICE from a pilot scored on the 38 seen classes (never the held-out ones): seed 2, 800 steps
# of pre-training, 100 of fine-tune; seen top-1 0.81 / 0.85 / 0.88 at ratios 0.25 / 0.5 / 1.0.
flags.DEFINE_float('clipa_tune_lr_ratio', 1.0,
                   'Peak learning rate of the full-token fine-tune over the pre-training one.')
flags.DEFINE_float('clipa_tune_warmup_share', 0.1, 'Warmup steps of the fine-tune / its steps.')
flags.DEFINE_integer('clipa_calibration_steps', 40,
                     'Steps of each configuration timed to pick the step counts (the first '
                     'window of 10, with the compile, is left out).')
flags.DEFINE_list('clipa_seeds', ['0', '1'],
                  'config.seed and data.synthetic.seed of each repetition (the synthetic seed '
                  'also draws the held-out evaluation images; both schedules of a seed share '
                  'them).')

MODULE = 'benchmarks.clipa_schedule'


# The reduced tokens of the CLIPA pre-training (CHOICE): image side halved (16 px: 4 of the 16
# patch tokens; CLIPA's best image reduction is resizing, and random masking would often hide the
# one shape an image shows) and 8 text tokens with syntax masking (content words kept first).
CLIPA_PRETRAIN_TOKENS = dict(image_size=16, text_length=8, text_mask='syntax')


def allocate_steps(budget_s, full_step_s, reduced_step_s, pretrain_share):
  """Step counts that give both schedules `budget_s` seconds of training (the plan).

  Args:
    budget_s: training seconds of each schedule.
    full_step_s: seconds per full-token step (the full-token run and the fine-tune).
    reduced_step_s: seconds per reduced-token step (the pre-training).
    pretrain_share: fraction of the CLIPA schedule's budget spent pre-training.

  Returns:
    dict(full=, pretrain=, tune=) steps (each >= 1): full * full_step_s, and
    pretrain * reduced_step_s + tune * full_step_s, both about budget_s (within a step).
  """
  steps = lambda seconds, step_s: max(1, round(seconds / step_s))
  return dict(full=steps(budget_s, full_step_s),
              pretrain=steps(pretrain_share * budget_s, reduced_step_s),
              tune=steps((1 - pretrain_share) * budget_s, full_step_s))


def _schedule_config(seed, steps, *, reduced, tokenizer_path='', learning_rate=None,
                     warmup_steps=None, init_from='', zeroshot=True):
  """configs/tiny.py for one run of `steps` steps, reduced or full tokens, evaluated at the end."""
  config = tiny.get_config()
  base_warmup, base_steps = config.optimizer.warmup_steps, config.total_steps
  config.seed = config.data.synthetic.seed = seed
  config.total_steps = steps
  # Wall times per window of 10 steps in metrics.jsonl (the compile is in the first window);
  # short windows, but not every step, which would synchronise the host with every step.
  config.log_every_steps = min(10, steps)
  config.eval_every_steps = config.checkpoint_every_steps = steps   # At the end only.
  config.keep_checkpoints = 1
  # The tiny config's warmup share of the steps unless given.
  config.optimizer.warmup_steps = (warmup_steps if warmup_steps is not None else
                                   round(steps * base_warmup / base_steps))
  if learning_rate is not None:
    config.optimizer.learning_rate = learning_rate
  config.tokenizer.model_path = tokenizer_path
  config.init_from = init_from
  config.eval.zeroshot = zeroshot
  if reduced:
    config.data.image_size = CLIPA_PRETRAIN_TOKENS['image_size']
    config.data.text_length = CLIPA_PRETRAIN_TOKENS['text_length']
    config.data.text_mask.kind = CLIPA_PRETRAIN_TOKENS['text_mask']
    config.data.text_mask.length = 0   # Words kept = data.text_length.
  return config_lib.validate(config)


def _run(config, workdir):
  """Trains `config` in `workdir` through basic.train; -> timings, final evaluation and load.

  Times come from metrics.jsonl: a row per window of log_every_steps steps, whose
  `train/images_per_sec` gives the window's wall time. The first window holds the compile; the
  training time counts the later windows as measured and the first at their median step time.
  """
  from basic import metric_writers  # pylint: disable=g-import-not-at-top
  load = os.getloadavg()[0]
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  if config.eval.zeroshot and 'zeroshot/top1' not in results:   # SIGTERM: stopped early.
    raise RuntimeError(f'{workdir}: training stopped before its last step.')
  rows = metric_writers.read_jsonl(os.path.join(workdir, metric_writers.METRICS_FILE))
  rows = sorted((r for r in rows if 'train/images_per_sec' in r), key=lambda r: r['step'])
  ends = [r['step'] for r in rows]
  steps = [e - s for e, s in zip(ends, [0] + ends[:-1])]                   # [windows]
  seconds = [k * config.batch_size / r['train/images_per_sec'] for k, r in zip(steps, rows)]
  later = list(zip(steps[1:], seconds[1:])) or [(steps[0], seconds[0])]   # One window: as is.
  median = statistics.median(t / k for k, t in later)
  train_s = sum(t for _, t in later) + (median * steps[0] if len(rows) > 1 else 0.0)
  return dict(steps=config.total_steps, train_s=train_s, first_s=seconds[0],
              median_step_s=median, wall_s=wall, top1=results.get('zeroshot/top1'),
              load=(load + os.getloadavg()[0]) / 2)


def _calibrate(directory, seed, reduced, tokenizer_path):
  """Median seconds per step of basic.train's loop (input pipeline included, compile excluded)."""
  config = _schedule_config(seed, FLAGS.clipa_calibration_steps, reduced=reduced,
                            tokenizer_path=tokenizer_path, zeroshot=False)
  name = 'calibrate_reduced' if reduced else 'calibrate_full'
  return _run(config, os.path.join(directory, name))['median_step_s']


def _clipa_schedule_seed(directory, seed, plan):
  """The CLIPA run (pre-train, then fine-tune), then the full-token run, of one seed.

  The CLIPA run takes the planned steps (`allocate_steps` at the calibrated step times). The
  machine's load moves between runs, so the full-token run's steps come from measured times:
  the CLIPA run's measured training time at the fine-tune's median step time (the same step as
  the full-token run's, measured just before it); only this last prediction can be off.
  """
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = os.path.join(directory, f'seed{seed}')
  tokenizer_path = tokenizer_lib.ensure_tokenizer(
      _schedule_config(seed, 1, reduced=False), directory)   # One tokenizer for all its runs.
  pretrain_dir = os.path.join(directory, 'pretrain')
  pretrain = _run(_schedule_config(seed, plan['pretrain'], reduced=True,
                                   tokenizer_path=tokenizer_path), pretrain_dir)
  print(f'seed {seed} CLIPA pre-training: {pretrain}', flush=True)
  tune_lr = FLAGS.clipa_tune_lr_ratio * tiny.get_config().optimizer.learning_rate
  tune = _run(_schedule_config(
      seed, plan['tune'], reduced=False, tokenizer_path=tokenizer_path,
      learning_rate=tune_lr, warmup_steps=round(FLAGS.clipa_tune_warmup_share * plan['tune']),
      init_from=pretrain_dir), os.path.join(directory, 'tune'))
  print(f'seed {seed} CLIPA fine-tune: {tune}', flush=True)
  full_steps = max(1, round((pretrain['train_s'] + tune['train_s']) / tune['median_step_s']))
  full = _run(_schedule_config(seed, full_steps, reduced=False, tokenizer_path=tokenizer_path),
              os.path.join(directory, 'full'))
  print(f'seed {seed} full tokens: {full}', flush=True)
  return dict(seed=seed, full=full, pretrain=pretrain, tune=tune)


def clipa_schedule_bench(command):
  """Runs; -> the section `## CLIPA schedule vs full tokens at equal
  time`."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  budget, share = FLAGS.clipa_budget_s, FLAGS.clipa_pretrain_share
  seeds = [int(s) for s in FLAGS.clipa_seeds]
  load_before, start = common.load_average(), time.perf_counter()
  with tempfile.TemporaryDirectory() as directory:
    tokenizer_path = tokenizer_lib.ensure_tokenizer(
        _schedule_config(seeds[0], 1, reduced=False), os.path.join(directory, 'calibrate'))
    full_step_s = _calibrate(directory, seeds[0], False, tokenizer_path)
    reduced_step_s = _calibrate(directory, seeds[0], True, tokenizer_path)
    steps = allocate_steps(budget, full_step_s, reduced_step_s, share)
    print(f'calibrated: {full_step_s:.3f} s per full-token step, {reduced_step_s:.3f} s per '
          f'reduced-token step -> steps {steps}', flush=True)
    runs = [_clipa_schedule_seed(directory, seed, steps) for seed in seeds]
  total_min, load_after = (time.perf_counter() - start) / 60, common.load_average()
  config = tiny.get_config()
  tokens = CLIPA_PRETRAIN_TOKENS
  lines = [
      '## CLIPA schedule vs full tokens at equal time', '',
      f'Command: `{command}` ({total_min:.0f} min in all{common.niceness()}).', '',
      f'Machine: {jax.devices()[0].platform.upper()}, {os.cpu_count()} cores, shared (CI runs '
      f'and other jobs); load average (1 / 5 / 15 min) {load_before} before, {load_after} '
      'after; the 1-min load average of each run (mean of its start and end) is in the table.',
      '',
      'Both schedules train configs/tiny.py\'s model (0.43M parameters, batch '
      f'{config.batch_size}) through `basic.train.train_and_evaluate` and are scored by its '
      f'evaluator: zero-shot top-1 on the {config.data.synthetic.num_heldout} held-out colour x '
      'shape classes (never in training) among all 48, '
      f'{config.data.synthetic.eval_per_class} images each, at 32 px and 16 text tokens.', '',
      f'- Full tokens: {config.data.image_size} px (16 patch tokens), '
      f'{config.data.text_length} text tokens; lr {config.optimizer.learning_rate:g}, warmup '
      f'the tiny config\'s share ({config.optimizer.warmup_steps} / {config.total_steps} of the '
      'steps), cosine to 0.',
      f'- CLIPA: pre-training on reduced tokens, {tokens["image_size"]} px '
      f'({(tokens["image_size"] // config.model.image.patch_size) ** 2} patch tokens) and '
      f'{tokens["text_length"]} text tokens ({tokens["text_mask"]} text masking), same lr and '
      f'warmup share, for {share:.0%} of the budget (CHOICE); then a full-token fine-tune from '
      'its checkpoint (`init_from`; the learned position embeddings interpolated 2x2 -> 4x4 and '
      f'8 -> 16) for the rest, with its own warmup '
      f'({FLAGS.clipa_tune_warmup_share:.0%} of its steps) and cosine to 0 from lr '
      f'{FLAGS.clipa_tune_lr_ratio:g} x the pre-training one (CHOICE, from a pilot scored on '
      'the seen classes only, never on the held-out ones: 0.25 / 0.5 / 1.0 gave seen top-1 '
      '0.81 / 0.85 / 0.88; comment of the flag in benchmarks/clipa_schedule.py).',
      f'- Step counts: the CLIPA run gets {steps["pretrain"]} + {steps["tune"]} steps, '
      f'{budget:.0f} s (--clipa_budget_s) at the step times measured first in the same process '
      f'({FLAGS.clipa_calibration_steps} steps of each configuration through '
      '`train_and_evaluate`, input pipeline included, the first 10 with the compile left out): '
      f'{full_step_s:.3f} s per full-token step, {reduced_step_s:.3f} s per reduced-token step '
      f'({full_step_s / reduced_step_s:.2f}x faster). The load of this machine moves between '
      "runs, so the full-token run's budget is the CLIPA run's *measured* training time, and "
      "its steps come from the fine-tune's median step (the same full-token step, measured "
      'just before): the two measured training times differ only by the error of that one '
      'prediction (the CLIPA total row gives the ratio).',
      '- Training time: the sum of the wall times of the windows of 10 steps that '
      '`train_and_evaluate` logs (`train/images_per_sec`), the first window (it holds the '
      'compile) counted at the median step time of the others. Wall: the whole '
      '`train_and_evaluate` call (setup, compile, checkpoint and evaluation included). The seeds '
      'set `config.seed` and `data.synthetic.seed` (training stream and evaluation images).',
      '',
      '| seed | schedule | steps | training time (s) | median step (s) | wall (s) | load | '
      'held-out top-1 |',
      '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for run in runs:
    seed, full, pre, tune = run['seed'], run['full'], run['pretrain'], run['tune']
    lines += [
        f'| {seed} | full tokens | {full["steps"]} | {full["train_s"]:.0f} | '
        f'{full["median_step_s"]:.3f} | {full["wall_s"]:.0f} | {full["load"]:.1f} | '
        f'**{full["top1"]:.3f}** |',
        f'| {seed} | CLIPA pre-training ({tokens["image_size"]} px, {tokens["text_length"]} '
        f'tokens) | {pre["steps"]} | {pre["train_s"]:.0f} | {pre["median_step_s"]:.3f} | '
        f'{pre["wall_s"]:.0f} | {pre["load"]:.1f} | ({pre["top1"]:.3f} at 16 px) |',
        f'| {seed} | CLIPA fine-tune (32 px, 16 tokens) | {tune["steps"]} | '
        f'{tune["train_s"]:.0f} | {tune["median_step_s"]:.3f} | {tune["wall_s"]:.0f} | '
        f'{tune["load"]:.1f} | |',
        f'| {seed} | CLIPA total | {pre["steps"] + tune["steps"]} | '
        f'{pre["train_s"] + tune["train_s"]:.0f} '
        f'({(pre["train_s"] + tune["train_s"]) / full["train_s"]:.2f}x full) | | '
        f'{pre["wall_s"] + tune["wall_s"]:.0f} | | **{tune["top1"]:.3f}** |',
    ]
  full_top1 = [r['full']['top1'] for r in runs]
  clipa_top1 = [r['tune']['top1'] for r in runs]
  mean = lambda x: sum(x) / len(x)
  winner = ('CLIPA' if mean(clipa_top1) > mean(full_top1) else
            'full tokens' if mean(clipa_top1) < mean(full_top1) else 'neither (a tie)')
  per_seed = '; '.join(
      f"seed {r['seed']}: {r['tune']['top1'] - r['full']['top1']:+.3f} top-1 in "
      f"{(r['pretrain']['train_s'] + r['tune']['train_s']) / r['full']['train_s']:.2f}x the "
      'training time' for r in runs)
  lines += ['', f'Mean held-out top-1 over {len(runs)} seed(s): full tokens '
            f'{mean(full_top1):.3f}, CLIPA {mean(clipa_top1):.3f}: **{winner}** wins at this '
            f'budget. CLIPA against full tokens, {per_seed}.']
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, clipa_schedule_bench)
