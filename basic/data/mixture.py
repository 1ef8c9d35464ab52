"""Data source 'mixture': a weighted mixture of named sources, each resumed where it stopped.

  config.data.source = 'mixture'
  config.data.mixture.laion = ml_collections.ConfigDict(dict(
      source='webdataset', weight=0.7, webdataset_pattern='laion/{00000..00999}.tar'))
  config.data.mixture.cc12m = ml_collections.ConfigDict(dict(
      source='tfrecord', weight=0.3, tfrecord_pattern='cc12m/*.tfrecord', seed=1))
  # then, from the command line: --config.data.mixture.laion.weight=0.5

Components. `config.data.mixture` maps a name to a component: `source` (any registered source
but 'mixture'), `weight` (> 0; weights are relative, normalised by their sum) and that source's
own fields (its DEFAULTS, filled in by config_defaults.fill and validated by the source's own
`validate`; errors name `config.data.mixture.<name>.<field>`). The fields every source shares
(image_size, text_length, augment, threads, ...) are config.data's, the same for all components.
Names are the stable keys of the checkpointed cursor and of command-line overrides.

Composition of the global batch of step s (`composition`), a pure function of
(config.data.seed, s, the weights, batch_size), the same on every host: component c gets
n_c = floor(B w_c) or floor(B w_c) + 1 of the B slots, the R = B - sum_c floor(B w_c) extra slots
going by systematic sampling (points u, u + 1, ..., u + R - 1, u ~ U[0, 1) of (seed, s), over
consecutive intervals of length frac(B w_c)), so E[n_c] = B w_c exactly and every step is within
one example of it; the B slots' components are then permuted by (seed, s). Host p of P takes
slots p B/P .. (p + 1) B/P - 1 and fills each with the next example of ITS OWN stream of that
component (each source's per-host sharding keeps the hosts' examples disjoint).

Cursor. Each component is its own stream (its source's `batches` with one example per element,
as for process_count hosts of batch_size = process_count), with its own cursor
{'step': examples taken, 'position': the position of its stream, 'dropped': of them dropped};
the mixture's cursor is those of all components, `state()['streams']` of the TrainIterator, saved
in the checkpoint per host (basic.checkpoint.stream_item). So a resumed run continues the
composition at its step and every component where it stopped: the stream is a pure function of
(seed, step, component cursors). The mixture's own 'position' counts the slots filled,
(step + 1) * B_local, and 'dropped' sums the components'. A component added to the config of a
resumed run starts at its beginning; weights may change on resume (config_lib.RESUME_RULES): the
composition is then drawn with the new weights from that step on.

Evaluation data is not affected (config.eval). The reference of `composition` (an explicit count
of the slots by the same rule, per step) is in tests/test_mixture.py.
"""
import copy
import re
from typing import Optional

import ml_collections
import numpy as np

import basic.data
from basic.data import tf_setup

DEFAULTS = {'mixture': {}}   # name -> component (see above); set by the experiment config.
# Stream id of the composition draws (sources.py uses 1 to 4, the pipeline 5, webdataset 6).
_MIXTURE = 7
_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
# Cursor fields of a component, in the order of the 'streams' array of a batch.
CURSOR = ('step', 'position', 'dropped')


# --- The composition of a global batch. -----------------------------------------------------------


def normalised_weights(config) -> np.ndarray:
  """float64 [K]: the components' weights (sorted by name) divided by their sum."""
  weights = np.array([float(config.data.mixture[n].weight) for n in names(config)])
  return weights / weights.sum()


def composition(weights: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The component of each of the `batch_size` slots of global batch `step`: int64 [B].

  Counts n_c = floor(B w_c) + (1 for the components hit by R systematic points u + r,
  r = 0 .. R - 1, u ~ U[0, 1) of (seed, step), on consecutive intervals of length
  frac(B w_c)); R = B - sum floor(B w_c). Then the slots are permuted by (seed, step).
  """
  quotas = np.asarray(weights, np.float64) * batch_size
  base = np.floor(quotas).astype(np.int64)
  extra = batch_size - int(base.sum())
  rng = np.random.Generator(np.random.Philox(key=(seed, _MIXTURE), counter=(0, step, 0, 0)))
  u = rng.random()
  edges = np.cumsum(quotas - base)
  hits = np.minimum(np.searchsorted(edges, u + np.arange(extra), side='right'), len(base) - 1)
  counts = base + np.bincount(hits, minlength=len(base))
  return rng.permutation(np.repeat(np.arange(len(base), dtype=np.int64), counts))


# --- Components' configs. -------------------------------------------------------------------------


def names(config) -> list[str]:
  """The components' names, sorted (the order of the cursor arrays)."""
  return sorted(config.data.mixture.keys())


def component_defaults(source_name: str) -> dict:
  """The schema of a component of `source_name`: the source's DEFAULTS (no default weight)."""
  return copy.deepcopy(getattr(basic.data.SOURCES.get(source_name), 'DEFAULTS', {}))


def component_config(config, name: str, **overrides) -> ml_collections.ConfigDict:
  """`config` as the component `name`'s source reads it: config.data's shared fields with the
  component's own (source included) over them, no weight, no mixture; `overrides` at the top
  level (e.g. batch_size)."""
  tree = config.to_dict()
  data = {k: v for k, v in tree['data'].items() if k != 'mixture'}
  own = {k: v for k, v in tree['data']['mixture'][name].items() if k != 'weight'}
  for key, value in own.items():
    if isinstance(value, dict) and isinstance(data.get(key), dict):
      data[key] = {**data[key], **value}
    else:
      data[key] = value
  tree.update(data=data, **overrides)
  return ml_collections.ConfigDict(tree)


def _renamed(error: Exception, name: str, fields) -> str:
  """The message of a component source's error, its fields named as the component's."""
  message = str(error)
  for field in sorted(fields, key=len, reverse=True):
    message = re.sub(rf'config\.data\.{re.escape(field)}\b',
                     f'config.data.mixture.{name}.{field}', message)
  return message


def _as_component(fn, config, name: str):
  """fn(component_config) with errors naming config.data.mixture.<name>.<field>."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  fields = config.data.mixture[name].keys()
  try:
    return fn(component_config(config, name))
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(_renamed(e, name, fields)) from e
  except ValueError as e:
    raise ValueError(_renamed(e, name, fields)) from e


# --- The source's entry points (basic.data.SOURCES). ----------------------------------------------


def validate(config):
  """config.data.mixture: named components, each a registered source (not 'mixture') with a
  weight > 0 and only its source's fields, validated by that source (errors naming
  config.data.mixture.<name>.<field>); config.data.seed an integer >= 0."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  mixture = config_lib.get_field(config, 'data.mixture')
  if not isinstance(mixture, ml_collections.ConfigDict) or not mixture:
    value = mixture.to_dict() if isinstance(mixture, ml_collections.ConfigDict) else mixture
    config_lib.fail('data.mixture', value, "must name at least one component when "
                    "config.data.source='mixture', e.g. config.data.mixture.a = "
                    "ConfigDict(dict(source='tfrecord', weight=1.0, tfrecord_pattern=...)).")
  config_lib.check_int(config, 'data.seed', 0)
  registered = sorted(set(basic.data.SOURCES.names()) - {'mixture'})
  for name in names(config):
    field = f'data.mixture.{name}'
    node = mixture[name]
    if not _NAME.fullmatch(name):
      config_lib.fail(field, node, 'a component name must be an identifier ([A-Za-z_][A-Za-z0-9_]*'
                      '), as it is a command-line field.')
    if not isinstance(node, ml_collections.ConfigDict):
      config_lib.fail(field, node, 'must be a ConfigDict with source, weight and the fields of '
                      'its source.')
    source = config_lib.get_field(config, f'{field}.source')
    if source not in registered:
      config_lib.fail(f'{field}.source', source, f'must be one of {registered}.')
    weight = config_lib.get_field(config, f'{field}.weight')
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        0 < weight < float('inf')):
      config_lib.fail(f'{field}.weight', weight, 'must be a number > 0 (weights are relative).')
    allowed = {'source', 'weight', *component_defaults(source)}
    for key in node.keys():
      if key not in allowed:
        config_lib.fail(f'{field}.{key}', node[key], f'not a field of a {source!r} component '
                        f'(fields: {sorted(allowed)}; the shared ones are config.data\'s).')
    entry = basic.data.SOURCES.get(source)
    if hasattr(entry, 'validate'):
      _as_component(entry.validate, config, name)


def check(config, *, process_index: int = 0, process_count: int = 1) -> dict:
  """{name: the component source's handle for this host}; errors name the component's fields."""
  handles = {}
  for name in names(config):
    entry = basic.data.SOURCES.get(config.data.mixture[name].source)
    if hasattr(entry, 'check'):
      handles[name] = _as_component(
          lambda c, entry=entry: entry.check(c, process_index=process_index,
                                             process_count=process_count), config, name)
    else:
      handles[name] = None
  return handles


def batches(config, handles: dict, *, start_step: int, start_position: int, local_batch: int,
            process_index: int, process_count: int, start_streams: Optional[dict] = None):
  """Host batches {'image', 'caption', 'position', 'dropped', 'streams'} of steps start_step, ...

  Each component's stream (its source's `batches` with local_batch = 1, batch_size =
  process_count, from its cursor in `start_streams`, {name: {'step', 'position', 'dropped'}},
  missing: its beginning) is chosen from slot by slot as `composition` says for this host's
  slots; 'streams' int64 [K, 3] is every component's cursor (CURSOR) after the batch, K sorted
  by name. start_position is not used (the mixture's position is (step + 1) * B_local).
  """
  del start_position
  tf = tf_setup.configure_tensorflow()
  from basic.data import sources  # pylint: disable=g-import-not-at-top
  start_streams = start_streams or {}
  components = names(config)
  weights = normalised_weights(config)
  batch_size, seed = config.batch_size, config.data.seed
  first_slot = process_index * local_batch

  streams, start = [], []
  for c, name in enumerate(components):
    cursor = {k: int(start_streams.get(name, {}).get(k, 0)) for k in CURSOR}
    start.append([cursor[k] for k in CURSOR])
    comp = component_config(config, name, batch_size=process_count)
    ds = basic.data.SOURCES.get(comp.data.source).batches(
        comp, handles[name], start_step=cursor['step'], start_position=cursor['position'],
        local_batch=1, process_index=process_index, process_count=process_count)
    streams.append(ds.map(sources.plain(lambda b, c=c: {
        'image': b['image'][0], 'caption': b['caption'][0],
        'position': tf.cast(b['position'], tf.int64), 'component': tf.constant(c, tf.int64),
        'dropped': tf.cast(b['dropped'], tf.int64) if 'dropped' in b else
                   tf.constant(-1, tf.int64)})))

  def host_slots(step):
    return composition(weights, batch_size, seed, int(step))[first_slot:first_slot + local_batch]

  choices = tf.data.Dataset.counter(start=start_step, dtype=tf.int64).map(sources.plain(
      lambda step: tf.ensure_shape(tf.numpy_function(host_slots, [step], tf.int64, stateful=False),
                                   [local_batch])))
  examples = tf.data.Dataset.choose_from_datasets(streams, choices.unbatch())
  num = len(components)

  def advance(state, batch):
    """state (step, cursors int64 [K, 3]) -> the cursors after `batch`; see CURSOR."""
    step, cursors = state
    onehot = tf.equal(batch['component'][None, :], tf.range(num, dtype=tf.int64)[:, None])
    taken = tf.reduce_sum(tf.cast(onehot, tf.int64), axis=1)                    # [K]
    last = tf.reduce_max(tf.where(onehot, batch['position'][None, :], -1), 1)    # [K]
    last_dropped = tf.reduce_max(tf.where(onehot, batch['dropped'][None, :], -1), 1)
    position = tf.where(taken > 0, last, cursors[:, 1])
    # Records consumed minus examples taken, unless the source counts its own drops.
    counted = cursors[:, 2] + (position - cursors[:, 1]) - taken
    dropped = tf.where(last_dropped >= 0, last_dropped, counted)
    cursors = tf.stack([cursors[:, 0] + taken, position, dropped], axis=1)
    return (step + 1, cursors), {
        'image': batch['image'], 'caption': batch['caption'],
        'position': (step + 1) * local_batch, 'dropped': tf.reduce_sum(cursors[:, 2]),
        'streams': cursors}

  initial = (tf.constant(start_step, tf.int64), tf.constant(start, tf.int64, [num, 3]))
  return examples.batch(local_batch, drop_remainder=True).scan(initial, sources.plain(advance))


def streams(config) -> list[str]:
  """The names of the sub-streams whose cursors the pipeline keeps (TrainIterator.state())."""
  return names(config)


def captions(config, n: int):
  """Up to n captions: about n w_c from each component's `captions`, in name order."""
  counts = np.floor(normalised_weights(config) * n + 0.5).astype(int)
  for name, count in zip(names(config), counts):
    comp = component_config(config, name)
    yield from basic.data.SOURCES.get(comp.data.source).captions(comp, int(count))
