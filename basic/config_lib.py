"""Config validation: a bad config fails before anything is compiled, naming the field.

`validate(config)` checks every field the framework reads; `ConfigError` messages start with
the dotted field name, e.g. `config.batch_size=100: not divisible by config.microbatch_size=64`.
"""
import json
import re

import ml_collections

from basic import config_defaults
from basic import contrastive
from basic import optim
from basic import tokenizer as tokenizer_lib
from basic import models



class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


def _get(config, field):
  node = config
  for part in field.split('.'):
    if part not in node:
      raise ConfigError(f'config.{field}: missing.')
    node = node[part]
  return node


def _fail(field, value, why):
  raise ConfigError(f'config.{field}={value!r}: {why}')


def _int(config, field, minimum):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, value, f'must be an integer >= {minimum}.')
  return value


def _positive(config, field):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    _fail(field, value, 'must be a number > 0.')
  return value


def _choice(config, field, choices):
  value = _get(config, field)
  if value not in choices:
    _fail(field, value, f'must be one of {list(choices)}.')
  return value


def _str(config, field):
  value = _get(config, field)
  if not isinstance(value, str):
    _fail(field, value, 'must be a string.')
  return value


def _bool(config, field):
  value = _get(config, field)
  if not isinstance(value, bool):
    _fail(field, value, 'must be True or False.')
  return value


# The checks, for the `validate` of extensions (towers, losses, data sources, evaluators): each
# takes the dotted field under `config.` and raises ConfigError naming it; they return the value.
def check_sizes_unset(config, field: str, variant: str, sizes):
  """With `config.<field>.variant` set, the tower's explicit size fields `sizes` must be unset
  (0, () or ''): a config names either the variant or the sizes."""
  cfg = _get(config, field)
  for key in sizes:
    if cfg[key]:
      _fail(f'{field}.{key}', cfg[key], f"must be unset (0, () or '') with {field}.variant="
            f'{variant!r}: set either the variant or the sizes.')


get_field = _get
fail = _fail
check_int = _int
check_positive = _positive
check_choice = _choice
check_str = _str
check_bool = _bool


def validate(config: ml_collections.ConfigDict, *, num_processes: int = 1,
             num_data_devices: int = 1):
  """Raises ConfigError naming the first bad field. Returns the config unchanged.

  The fields `config` lacks are checked at their defaults (basic.config_defaults.fill).
  """
  original, config = config, config_defaults.fill(config)
  n = _int(config, 'batch_size', 1)
  m = _int(config, 'microbatch_size', 1)
  if n % m:
    _fail('batch_size', n, f'not divisible by config.microbatch_size={m}.')
  if n % num_processes:
    _fail('batch_size', n, f'not divisible by the number of processes ({num_processes}).')
  if m % num_data_devices:
    _fail('microbatch_size', m,
          f'not divisible by the number of data-parallel devices ({num_data_devices}).')
  from basic import losses  # pylint: disable=g-import-not-at-top
  losses.validate(config)   # config.loss: a registered loss, and its own fields (basic.losses).
  if _int(config, 'loss_chunk_size', -1) == -1:
    _positive(config, 'loss_chunk_budget_mib')
  for field, choices in (('loss_sharding', ('sharded', 'replicated')),
                         ('loss_precision', tuple(contrastive.PRECISIONS))):
    if field in config:   # Absent (configs saved by older versions): 'sharded', 'highest'.
      _choice(config, field, choices)
  _int(config, 'gradcache_unroll', 1)
  if 'peak_flops_per_device' in config:   # Absent (configs saved by older versions): 0.
    peak = config.peak_flops_per_device
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak < 0:
      _fail('peak_flops_per_device', peak, 'must be a number >= 0 (FLOP/s; 0 = unknown).')
  for field in ('total_steps', 'log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    _int(config, field, 1)
  _int(config, 'keep_checkpoint_every_steps', 0)
  _choice(config, 'on_nonfinite', ('stop', 'skip'))
  _int(config, 'debug_nan_at_step', 0)
  _validate_failure_fields(config)
  if not isinstance(_get(config, 'init_from'), str):
    _fail('init_from', config.init_from, 'must be a path (str); empty for none.')
  _validate_init_from_params(config)
  _int(config, 'seed', 0)
  _validate_ema_and_profile(config)
  _validate_wandb(config)

  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.validate(config)   # config.data: the common fields and the source's (basic.data).
  from basic import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.validate(config, num_processes=num_processes, num_data_devices=num_data_devices)

  _validate_model(config)

  _choice(config, 'tokenizer.kind', tokenizer_lib.KINDS)

  if _choice(config, 'optimizer.name', optim.OPTIMIZERS) == 'adafactorw':
    if not isinstance(_get(config, 'optimizer.factored'), bool):
      _fail('optimizer.factored', config.optimizer.factored, 'must be True or False.')
    decay_rate = _positive(config, 'optimizer.decay_rate')
    if decay_rate > 1:
      _fail('optimizer.decay_rate', decay_rate, 'must be in (0, 1] (Adafactor: 1 - t^-rate).')
    _positive(config, 'optimizer.eps')
  _choice(config, 'optimizer.schedule', optim.SCHEDULES)
  _positive(config, 'optimizer.learning_rate')
  _int(config, 'optimizer.warmup_steps', 0)
  if config.optimizer.weight_decay < 0:
    _fail('optimizer.weight_decay', config.optimizer.weight_decay, 'must be >= 0.')
  _validate_freezing(config)

  for axis, size in config.mesh.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      _fail(f'mesh.{axis}', size, 'must be a positive integer or -1 (the remaining devices).')
  if 'sharding' in config:
    _validate_sharding(config)
  return original


def _regex(field, value, pattern):
  if not isinstance(pattern, str):
    _fail(field, value, f'{pattern!r} is not a regex string.')
  try:
    re.compile(pattern)
  except re.error as e:
    _fail(field, value, f'{pattern!r} is not a valid regex ({e}).')


def _validate_freezing(config):
  """config.lock_image / lock_text bools, lock_*_unlocked_blocks integers >= 0 (only with the
  lock; at most the tower's depth: basic.freeze); config.optimizer.frozen a tuple of regexes,
  layer_decay in (0, 1], lr_mults a tuple of (regex, multiplier >= 0) pairs."""
  for side in ('image', 'text'):
    locked = _bool(config, f'lock_{side}')
    if _int(config, f'lock_{side}_unlocked_blocks', 0) and not locked:
      _fail(f'lock_{side}_unlocked_blocks', config[f'lock_{side}_unlocked_blocks'],
            f'needs config.lock_{side}=True (the blocks left trainable in a locked tower).')
  frozen = _get(config, 'optimizer.frozen')
  if isinstance(frozen, str) or not isinstance(frozen, (tuple, list)):
    _fail('optimizer.frozen', frozen, "must be a tuple of regexes, e.g. ('image/.*',).")
  for pattern in frozen:
    _regex('optimizer.frozen', frozen, pattern)
  decay = _get(config, 'optimizer.layer_decay')
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
    _fail('optimizer.layer_decay', decay, 'must be a number in (0, 1] (1.0 = off).')
  mults = _get(config, 'optimizer.lr_mults')
  if isinstance(mults, str) or not isinstance(mults, (tuple, list)):
    _fail('optimizer.lr_mults', mults, "must be a tuple of (regex, multiplier) pairs, e.g. "
          "(('text/.*', 0.1),).")
  for pair in mults:
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or isinstance(pair[1], bool)
        or not isinstance(pair[1], (int, float)) or not pair[1] >= 0):
      _fail('optimizer.lr_mults', mults, f'{pair!r} is not a (regex, multiplier >= 0) pair.')
    _regex('optimizer.lr_mults', mults, pair[0])


def _validate_init_from_params(config):
  """config.init_from_params: a tuple of regexes (each one must also match a parameter of the
  model: checked against the parameters by basic.train.params_from_checkpoint), only with
  config.init_from."""
  patterns = _get(config, 'init_from_params')
  if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)):
    _fail('init_from_params', patterns, "must be a tuple of regexes, e.g. ('image/.*',).")
  for pattern in patterns:
    _regex('init_from_params', patterns, pattern)
  if patterns and not config.init_from:
    _fail('init_from_params', patterns, 'needs config.init_from (the checkpoint to take them '
          'from).')


WANDB_MODES = ('', 'online', 'offline', 'disabled')


def _validate_wandb(config):
  """config.wandb: strings, tags a tuple of strings, mode one of WANDB_MODES; the other fields
  only with a project; a project needs wandb installed (checked without importing it)."""
  for field in ('project', 'entity', 'name', 'mode'):
    _str(config, f'wandb.{field}')
  _choice(config, 'wandb.mode', WANDB_MODES)
  tags = _get(config, 'wandb.tags')
  if not isinstance(tags, (tuple, list)) or not all(isinstance(t, str) and t for t in tags):
    _fail('wandb.tags', tags, 'must be a tuple of non-empty strings.')
  if not config.wandb.project:
    for field in ('entity', 'name', 'tags', 'mode'):
      if config.wandb[field]:
        _fail(f'wandb.{field}', config.wandb[field],
              "set without config.wandb.project, so no wandb run is made; set the project too.")
    return
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('wandb') is None:
    _fail('wandb.project', config.wandb.project,
          "Weights & Biases logging needs wandb, which is not installed: pip install '.[wandb]'.")


def _validate_ema_and_profile(config):
  """config.ema_decay in [0, 1); config.profile_steps () or (start >= 1, count >= 1);
  config.profile_all_processes a bool."""
  decay = _get(config, 'ema_decay')
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
    _fail('ema_decay', decay, 'must be a number in [0, 1) (0 = no EMA of the parameters).')
  steps = _get(config, 'profile_steps')
  if not isinstance(steps, (tuple, list)) or (steps and not (
      len(steps) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in steps)
      and steps[0] >= 1 and steps[1] >= 1)):
    _fail('profile_steps', steps, 'must be () (off) or (start, count): the integers start >= 1 '
          '(the first traced step, as logged) and count >= 1.')
  _bool(config, 'profile_all_processes')


def _validate_failure_fields(config):
  """Failure handling and fault injection (basic/failures.py, basic/workdir_lock.py)."""
  for name in ('shutdown_timeout_s', 'peer_poll_s', 'distributed_heartbeat_timeout_s',
               'workdir_lock_heartbeat_s', 'workdir_lock_stale_s'):
    _positive(config, name)
  for name in ('debug_raise_at_step', 'debug_fail_checkpoint_at_step', 'debug_finish_delay_s'):
    _int(config, name, 0)
  _int(config, 'debug_raise_process', -1)
  stale, beat = config.workdir_lock_stale_s, config.workdir_lock_heartbeat_s
  if stale < 2 * beat:
    _fail('workdir_lock_stale_s', stale, f'must be at least twice '
          f'config.workdir_lock_heartbeat_s={beat} (a live run would look stale).')


def _validate_model(config):
  """config.model: the joint fields, then each tower by its registry entry (basic.models): its
  name, no field its Model lacks, and its own `validate`."""
  _int(config, 'model.embed_dim', 1)
  _positive(config, 'model.temperature_init')
  _positive(config, 'model.temperature_min')
  _choice(config, 'model.dtype', tuple(models.DTYPES))
  for tower, towers in (('image', models.IMAGE_TOWERS), ('text', models.TEXT_TOWERS)):
    field = f'model.{tower}'
    name = _get(config, f'{field}.name')
    if name not in towers:
      _fail(f'{field}.name', name, f'unknown {towers.kind}; registered: {sorted(towers.names())}.')
    entry = towers.get(name)
    known = models.tower_fields(entry.Model)
    for key, value in config.model[tower].items():
      if key != 'name' and key not in known:
        _fail(f'{field}.{key}', value, f'not a field of the {name!r} {towers.kind} '
              f'(its fields: {sorted(known)}).')
    entry.validate(config, field)


def _validate_sharding(config):
  """config.sharding: rules ((regex, spec), ...) over the axes of config.mesh; fsdp fields."""
  axes = tuple(config.mesh.keys())
  rules = _get(config, 'sharding.rules')
  if not isinstance(rules, (tuple, list)):
    _fail('sharding.rules', rules, 'must be a tuple of (regex, spec) pairs.')
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      _fail(f'sharding.rules[{i}]', rule, 'must be a (regex, spec) pair.')
    try:
      re.compile(rule[0])
    except re.error as e:
      _fail(f'sharding.rules[{i}]', rule, f'bad regex: {e}.')
    spec = rule[1]
    if not isinstance(spec, (tuple, list)):
      _fail(f'sharding.rules[{i}]', rule, 'the spec must be a tuple (one entry per dimension).')
    for entry in spec:
      names = () if entry is None else (entry,) if isinstance(entry, str) else entry
      if not isinstance(names, (tuple, list)) or any(n not in axes for n in names):
        _fail(f'sharding.rules[{i}]', rule,
              f'spec entries must be None, a mesh axis or a tuple of mesh axes of config.mesh '
              f'{list(axes)}.')
  if not isinstance(_get(config, 'sharding.fsdp'), bool):
    _fail('sharding.fsdp', config.sharding.fsdp, 'must be True or False.')
  _int(config, 'sharding.fsdp_min_size', 1)


def check_range(config, field, low, high, *, high_open=False):
  """A (lo, hi) pair with low < lo <= hi <= high (hi < high if high_open)."""
  value = _get(config, field)
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
  if ok:
    lo, hi = value
    ok = low < lo <= hi and (hi < high if high_open else hi <= high)
  if not ok:
    _fail(field, value, f'must be a pair (lo, hi) with {low} < lo <= hi '
          f'{"<" if high_open else "<="} {high}.')


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """{'model.image.width': 128, ...} for logging hyper-parameters."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


# --- Resuming with a changed config. -------------------------------------------------------------
# How a field may differ between the config saved in a checkpoint and the config of the run that
# resumes from it. (fnmatch pattern on the dotted field name, rule); the first match wins.
# FIXED: the field shapes the train state or gives the data stream (and its saved position) its
# meaning; a change fails before anything is compiled (`resume_diff`). ALLOWED: the change is
# logged and the run continues (schedule / optimiser hyper-parameters, cadences, evaluation,
# execution strategy: microbatch_size, chunking, mesh and sharding, since checkpoints reshard;
# data paths, which may move). Fields absent on one side (configs of older versions) are
# logged, never fatal.
FIXED, ALLOWED = 'fixed', 'allowed'
RESUME_RULES = (
    ('model.*.remat', ALLOWED),        # memory / recomputation only.
    ('model.*', FIXED),                # parameter shapes and the function they compute.
    ('batch_size', FIXED),             # the contrastive task and the stream's step -> examples.
    ('loss', FIXED),                   # a loss may own parameters ('sigmoid': the bias).
    ('seed', FIXED),
    ('optimizer.name', FIXED),         # optimiser state structure.
    ('optimizer.factored', FIXED),
    ('ema_decay', FIXED),              # 0 or not: whether the state holds an EMA (checkpoints
                                       # without one fail naming the field); its value: the EMA.
    ('lock_*', FIXED),                 # frozen leaves hold no optimiser state (basic.freeze).
    ('optimizer.frozen', FIXED),
    ('tokenizer.model_path', ALLOWED),     # a moved file; its bytes are compared with the
    ('tokenizer.train_sentences', ALLOWED),  # checkpoint's tokenizer (basic.train).
    ('tokenizer.*', FIXED),
    ('data.mixture.*.weight', ALLOWED),  # the composition of the steps after the resume.
    ('data.mixture.*.tfrecord_pattern', ALLOWED),   # a component's paths, throughput: as below.
    ('data.mixture.*.webdataset_pattern', ALLOWED),
    ('data.mixture.*.data_dir', ALLOWED),
    ('data.mixture.*.cache', ALLOWED),
    ('data.tfrecord_pattern', ALLOWED),  # paths that may move.
    ('data.webdataset_pattern', ALLOWED),
    ('data.data_dir', ALLOWED),
    ('data.threads', ALLOWED),         # throughput only.
    ('data.prefetch', ALLOWED),
    ('data.cache', ALLOWED),
    ('data.augment.*', ALLOWED),
    ('data.text_mask.*', ALLOWED),
    ('data.*', FIXED),                 # source, image_size, text_length, seed, order, keys ...
    ('*', ALLOWED),                    # steps, schedule, cadences, eval, mesh, sharding, ...
)


def resume_rule(field: str) -> str:
  """FIXED or ALLOWED for a dotted field name, per RESUME_RULES."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  return next(rule for pattern, rule in RESUME_RULES if fnmatch.fnmatchcase(field, pattern))


def _plain(config) -> dict:
  """A ConfigDict or dict -> a flat {dotted name: JSON value} (tuples as lists)."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  tree = json.loads(json.dumps(tree, default=list))
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict) and value:
        walk(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = value
  walk(tree, '')
  return out


def resume_diff(saved, config) -> dict:
  """Compares the config saved in a checkpoint with the config of the run resuming from it.

  Returns {'allowed': [(field, old, new)], 'added': [...], 'removed': [...]} for the caller to
  log; raises ConfigError naming every changed FIXED field with its old and new value.
  """
  old, new = _plain(saved), _plain(config)
  changed = [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
  fixed = [c for c in changed if resume_rule(c[0]) == FIXED]
  if fixed:
    raise ConfigError(
        'Cannot resume from the checkpoint with a changed ' + '; '.join(
            f'config.{k}: {a!r} in the checkpoint, {b!r} now' for k, a, b in fixed) +
        '. These fields shape the train state or the data stream (basic/config_lib.py '
        'RESUME_RULES): restore the old values, use another --workdir, or start a new run from '
        'this one with --config.init_from.')
  return {'allowed': [c for c in changed if resume_rule(c[0]) == ALLOWED],
          'added': sorted(new.keys() - old.keys()), 'removed': sorted(old.keys() - new.keys())}
