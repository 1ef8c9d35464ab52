"""Orbax checkpoints of a run, local or on GCS (`gs://bucket/...`).

A checkpoint step directory `{directory}/{step}` holds four items, so that it describes itself:

  state      the train state (step, params, optimiser state), arrays with their shardings;
  config     the experiment config (JSON);
  data       where the input stream stands: per-host record positions and drop counts, and the
             base rng (JSON), so a resumed run sees the same data and randomness;
  tokenizer  the tokenizer's kind and model file the run tokenises with (base64 in JSON: the
             SentencePiece model, or CLIP's BPE merges file), so inference and continued
             training need nothing but the checkpoint. Checkpoints without a kind hold
             SentencePiece.

Saves are asynchronous and atomic: orbax writes into a temporary directory and commits it at the
end, so a save interrupted by `kill -9` leaves no step that `latest_step` would report; the
leftover temporary directory is removed when the next run opens the directory. A committed step
that cannot be read (files truncated or lost afterwards) is skipped by `restore_latest` in favour
of the previous one, with a warning, and moved aside into `{directory}/corrupt/` (kept for
inspection, never deleted).

A save that fails (a full disk, a gs:// error; asynchronous errors surface at the next `save`
or `wait`) raises `CheckpointWriteError` naming the step's path and the last committed step; the
failed step is never committed (its temporary directory is removed when the directory is next
opened), so the earlier steps stay restorable and a rerun resumes from the last committed one.

Older checkpoints restore into the current model and config: parameters saved under names since
changed (the Transformer MLP's 'Dense_0' / 'Dense_1', now 'fc1' / 'fc2') through the map of
basic.models.renames, and a saved config's missing fields at their defaults
(basic.config_defaults.fill).

Paths go through etils.epath (orbax writes arrays through tensorstore): see the README for the
environment variables that point both at a GCS emulator.
"""
import base64
import contextlib
import errno
import json
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from basic import config_defaults
from basic.models import renames

STATE_ITEM = 'state'
ITEMS = (STATE_ITEM, 'config', 'data', 'tokenizer')
# The JSON key of the tokenizer item holding the model file, per tokenizer kind.
TOKENIZER_KEYS = {'sentencepiece': 'sentencepiece_model_base64',
                  'clip_bpe': 'clip_bpe_merges_base64'}
CORRUPT_DIR = 'corrupt'


class CheckpointWriteError(RuntimeError):
  """A checkpoint save failed; the message names the step's path and the last good step."""


class _InjectedWriteFailure(dict):
  """A JSON item whose serialisation, inside orbax's background write, fails as a full disk
  would (fault injection: config.debug_fail_checkpoint_at_step)."""

  def items(self):
    raise OSError(errno.ENOSPC, 'No space left on device (injected by '
                  'config.debug_fail_checkpoint_at_step)')


def _abspath(path: str) -> str:
  path = str(path)
  return path if '://' in path else str(epath.Path(path).expanduser().resolve())


def _brief(error: Exception, limit: int = 300) -> str:
  text = str(error)
  return text if len(text) <= limit else text[:limit] + '...'


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=list))


def find_step_dir(path: str) -> tuple[str, Optional[int]]:
  """A checkpoints directory, a training workdir, or one step directory -> (directory, step).

  step is None when `path` is a directory of steps (then the latest is meant).
  """
  path = epath.Path(_abspath(path))
  if (path / 'checkpoints').is_dir():
    return str(path / 'checkpoints'), None
  if path.name.isdigit() and (path / 'state').is_dir():
    return str(path.parent), int(path.name)
  return str(path), None


@contextlib.contextmanager
def open_step(path: str, step: Optional[int] = None, *, field: Optional[str] = None):
  """Opens the checkpoint at `path` read-only: `with open_step(path) as (ckpt, step): ...`.

  Args:
    path: a training workdir, a checkpoints directory or one step directory, local or gs://
      (see `find_step_dir`).
    step: the step to read (default: the step directory's, else the latest).
    field: the config field or flag that named `path`, for the error (e.g. 'config.init_from').

  Yields:
    (a read-only Checkpointer, the step), closed on exit.

  Raises:
    FileNotFoundError: there is no checkpoint at `path`.
  """
  directory, found = find_step_dir(path)
  ckpt = Checkpointer(directory, read_only=True)
  try:
    step = step if step is not None else found if found is not None else ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'{field}={path!r}: no checkpoint there.' if field else
                              f'No checkpoint in {path}.')
    yield ckpt, step
  finally:
    ckpt.close()


class Checkpointer:
  """Save / restore the checkpoints of a run in `directory` (local path or gs://)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = None,
               keep_period: Optional[int] = None, async_save: bool = True,
               read_only: bool = False, debug_fail_at_step: int = 0):
    """
    Args:
      directory: where the step directories live (created unless read_only).
      max_to_keep: keep the last K steps (None: all) ...
      keep_period: ... plus every step that is a multiple of M, forever (None or 0: none).
      async_save: write in a background thread while training goes on.
      read_only: open for restoring only (inference, soups): nothing is created or cleaned.
      debug_fail_at_step: > 0: the save of that step fails in its background write (tests).
    """
    self.directory = _abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None, create=not read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._debug_fail_at_step = debug_fail_at_step
    self._async = async_save
    self._in_flight = None   # The step being written in the background, if any.
    self.last_committed = self.latest_step()

  def _write_error(self, step: int, error: Exception) -> CheckpointWriteError:
    last = (f'the last good checkpoint is step {self.last_committed} in {self.directory}'
            if self.last_committed is not None else 'no checkpoint was committed yet')
    return CheckpointWriteError(
        f'Saving checkpoint step {step} to {self.directory}/{step} failed '
        f'({type(error).__name__}: {_brief(error)}); {last}. The failed step is not committed; '
        'a rerun resumes from the last good step.')

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict, *,
           data: Optional[dict] = None, tokenizer_model: Optional[bytes] = None,
           tokenizer_kind: str = 'sentencepiece') -> bool:
    """Starts saving `state` at `step` (returns at once when async; `wait` to block).

    Args:
      step: the step number (the directory name).
      state: a pytree of (possibly sharded) jax.Arrays.
      config: the experiment config.
      data: JSON-able input-stream state (see module docstring).
      tokenizer_model: the tokenizer's model file (`serialized_model`).
      tokenizer_kind: its kind, a key of TOKENIZER_KEYS.
    """
    if tokenizer_kind not in TOKENIZER_KEYS:
      raise ValueError(f'Unknown tokenizer kind {tokenizer_kind!r}; one of '
                       f'{sorted(TOKENIZER_KEYS)}.')
    encoded = base64.b64encode(tokenizer_model).decode('ascii') if tokenizer_model else ''
    self.wait()   # Raises CheckpointWriteError if the previous (asynchronous) save failed.
    data = data or {}
    if self._debug_fail_at_step > 0 and step == self._debug_fail_at_step:
      data = _InjectedWriteFailure(data)
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(_config_dict(config)),
        data=ocp.args.JsonSave(data),
        tokenizer=ocp.args.JsonSave(
            {'kind': tokenizer_kind, TOKENIZER_KEYS[tokenizer_kind]: encoded}))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    self._in_flight = step
    logging.info('Saving checkpoint step %d to %s/%d%s.', step, self.directory, step,
                 ' (in the background)' if self._async else '')
    if not self._async:
      self.wait()
    return saved

  def restore(self, template, step: Optional[int] = None):
    """Restores the state at `step` (default latest) into the structure/shardings of `template`.

    `template` may hold jax.Arrays or jax.ShapeDtypeStructs with shardings; None restores the
    arrays as saved (on the default device), e.g. for inference on one host.
    """
    step = self._step(step)
    old_names = renames.is_old(self._state_metadata(step))   # Written before a renaming.
    if old_names and template is not None:
      template = renames.downgrade(template)
    args = ocp.args.StandardRestore(
        None if template is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
    state = self._manager.restore(step, args=ocp.args.Composite(state=args))['state']
    return renames.upgrade(state) if old_names else state

  def _state_metadata(self, step: int):
    """The saved state's tree of array metadata (names, shapes, dtypes) at `step`."""
    reader = ocp.StandardCheckpointer()
    try:
      return reader.metadata(
          epath.Path(self.directory) / str(step) / STATE_ITEM).item_metadata.tree
    finally:
      reader.close()

  def restore_latest(self, template) -> tuple[Optional[int], Any]:
    """-> (step, state) of the newest readable step, or (None, template) if there is none.

    A newer step that fails to restore while an older one restores is corrupt: it is logged,
    moved into `{directory}/corrupt/`, and the older one is used. If no step restores, the
    newest step's error is raised and nothing is moved (a template that does not match the
    checkpoints, say after a config change, fails every step alike).
    """
    failed = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(template, step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint step %d in %s cannot be restored (%s: %s); trying the '
                        'previous one.', step, self.directory, type(e).__name__, _brief(e))
        failed.append((step, e))
        continue
      for bad, error in failed:
        self._move_aside(bad, error)
      self.last_committed = step
      return step, state
    if failed:
      raise failed[0][1]
    return None, template

  def _move_aside(self, step: int, error: Exception):
    source = epath.Path(self.directory) / str(step)
    target = epath.Path(self.directory) / CORRUPT_DIR / f'{step}-{int(time.time())}'
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      logging.warning('Skipped corrupt checkpoint step %d (%s: %s); moved it to %s.', step,
                      type(error).__name__, _brief(error), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self._manager.reload()

  def restore_params(self, step: Optional[int] = None):
    """The parameters saved at `step` (default latest), whole, on this process's first device.

    Works for training checkpoints and for params-only ones (soups, conversions), and in
    multi-process runs: every process reads every array onto one of its own devices (restoring
    "as saved" would place each array on the devices that wrote it, which other processes
    cannot address). Callers place them on a mesh with `basic.sharding.put_whole`.
    """
    step = self._step(step)
    metadata = self._state_metadata(step)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                            metadata)
    return self.restore(template, step)['params']

  def restore_config(self, step: Optional[int] = None) -> ml_collections.ConfigDict:
    """The config saved at `step`, with the fields it lacks (an older version's) at their
    defaults and renamed ones upgraded (basic.config_defaults.fill)."""
    return config_defaults.fill(self._restore_json('config', step))

  def restore_data(self, step: Optional[int] = None) -> dict:
    return self._restore_json('data', step) or {}

  def restore_tokenizer(self, step: Optional[int] = None) -> Optional[bytes]:
    """The tokenizer model file saved with `step` (of `restore_tokenizer_kind`), or None if the
    checkpoint has none."""
    item = self._restore_json('tokenizer', step) or {}
    encoded = item.get(TOKENIZER_KEYS.get(item.get('kind', 'sentencepiece'), ''))
    return base64.b64decode(encoded) if encoded else None

  def restore_tokenizer_kind(self, step: Optional[int] = None) -> Optional[str]:
    """The kind of the tokenizer saved with `step` ('sentencepiece' for checkpoints written
    before kinds were saved), or None if the checkpoint has no tokenizer."""
    item = self._restore_json('tokenizer', step) or {}
    kind = item.get('kind', 'sentencepiece')
    return kind if item.get(TOKENIZER_KEYS.get(kind, '')) else None

  def _restore_json(self, item: str, step: Optional[int]):
    step = self._step(step)
    if not (epath.Path(self.directory) / str(step) / item).exists():
      return None
    return self._manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def _step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    return step

  def wait(self):
    """Blocks until the in-flight save is committed; CheckpointWriteError if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      raise self._write_error(step, e) from e
    if step is not None:
      self.last_committed = step

  def close(self):
    self._manager.close()


def gather_host_values(values) -> np.ndarray:
  """[k] numbers of this process -> int64 [process_count, k], the same on every process."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  return np.asarray(multihost_utils.process_allgather(local))


_STREAM_CURSOR = ('step', 'position', 'dropped')


def stream_item(cursor: dict, **extra) -> dict:
  """The JSON 'data' item of a checkpoint from this host's input-stream cursor
  (`basic.data.pipeline.TrainIterator.state()`): every host's position and drop count, gathered
  ({'process_count': P, 'positions': [P], 'dropped': [P]}), with a source of several streams
  (the data mixture) each stream's cursor on every host ('streams': {name: {'step': [P],
  'position': [P], 'dropped': [P]}}), plus the JSON fields `extra` (the train loop's rng and
  skip count). Every process calls it (a collective)."""
  streams = cursor.get('streams') or {}
  names = sorted(streams)
  rows = gather_host_values([cursor['position'], cursor['dropped']] + [
      streams[n][k] for n in names for k in _STREAM_CURSOR])   # [process_count, 2 + 3 K]
  item = {'process_count': int(rows.shape[0]), 'positions': rows[:, 0].tolist(),
          'dropped': rows[:, 1].tolist(), **extra}
  if names:
    per_stream = rows[:, 2:].reshape(rows.shape[0], len(names), len(_STREAM_CURSOR))
    item['streams'] = {n: {k: per_stream[:, i, j].tolist() for j, k in enumerate(_STREAM_CURSOR)}
                       for i, n in enumerate(names)}
  return item


def host_cursor(data: dict, step: int) -> dict:
  """This host's `TrainIterator` state from a checkpoint's 'data' item, at train step `step`
  (the batches consumed). Written by another number of processes: the record streams (sharded
  per process) restart from their beginning, logged; a synthetic stream, indexed by step, still
  resumes exactly (a mixture's components, each a stream of its own, restart too)."""
  cursor = {'step': step, 'position': 0, 'dropped': 0}
  if data.get('process_count') == jax.process_count():
    cursor['position'] = data['positions'][jax.process_index()]
    cursor['dropped'] = data['dropped'][jax.process_index()]
    if 'streams' in data:   # A data mixture: each component's cursor on this host.
      cursor['streams'] = {n: {k: values[jax.process_index()] for k, values in stream.items()}
                           for n, stream in data['streams'].items()}
  elif any(data.get('positions', [])):
    logging.warning('The checkpoint was written by %s processes, this run has %d: the input '
                    'streams (sharded per process) restart from their beginning.',
                    data.get('process_count'), jax.process_count())
  return cursor
