"""One run per workdir: a lock object `{workdir}/run.lock`, local or on gs://.

The lock is a small JSON object {host, pid, pid_start_time, start_time, heartbeat_time, run_id}
created with a create-only write (local: `open(O_CREAT | O_EXCL)`; gs://: an upload with the
precondition `ifGenerationMatch=0`, through gcsfs), so of two runs starting at once exactly one
creates it. The owner rewrites `heartbeat_time` every `heartbeat_s` seconds (a daemon thread) and
deletes the lock at exit. A run that finds the lock of a live owner fails at once with
`WorkdirLockedError` naming the owner. A lock is stale, and is taken over with a warning, when

  - its owner ran on this host and that process is gone (its pid does not exist, or belongs to a
    process started after the lock was taken: a reused pid), e.g. after `kill -9`; or
  - its heartbeat is older than `stale_s` seconds (config.workdir_lock_stale_s): an owner on
    another host that died without releasing it (a preempted VM).

Taking over removes the stale lock only if it is still the one that was read (gs://: a delete
with `ifGenerationMatch`; local: an atomic rename to `run.lock.stale-RUNID`), then creates a
new one with the create-only write, so two runs taking over at once cannot both succeed on GCS;
locally the remaining window is a few microseconds between the rename and the check.

Multi-host runs: process 0 takes the lock and broadcasts the outcome (`acquire_for_run`); every
process fails alike if the workdir is locked.
"""
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging
import jax
import numpy as np
import psutil

LOCK_FILE = 'run.lock'


class WorkdirLockedError(RuntimeError):
  """Another live run owns the workdir; the message names it (host, pid, start and heartbeat)."""


def _describe(info: dict, now: float) -> str:
  start = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('start_time', 0)))
  return (f"host {info.get('host')!r}, pid {info.get('pid')}, started {start}, last heartbeat "
          f"{now - info.get('heartbeat_time', 0):.0f} s ago (run {info.get('run_id')})")


class _LocalStore:
  """create / read / overwrite / remove-if-unchanged of one local file."""

  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def read(self) -> tuple[Optional[bytes], object]:
    """-> (contents, version) or (None, None) if there is no lock."""
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      return None, None
    return data, data

  def overwrite(self, data: bytes):
    tmp = f'{self.path}.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, self.path)

  def remove_if(self, version) -> bool:
    """Removes the lock if its contents are still `version`; -> whether it did."""
    aside = f'{self.path}.stale-{uuid.uuid4().hex[:8]}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    with open(aside, 'rb') as f:
      unchanged = f.read() == version
    if unchanged:
      os.remove(aside)
    else:   # Another run re-took it between our read and the rename: put it back.
      os.rename(aside, self.path)
    return unchanged


class _GcsStore:
  """The same on gs:// through gcsfs, with generation preconditions."""

  def __init__(self, path: str):
    import gcsfs  # pylint: disable=g-import-not-at-top
    self.path = path
    self.fs = gcsfs.GCSFileSystem()
    self.bucket, self.key, _ = self.fs.split_path(path)

  def create(self, data: bytes) -> bool:
    try:
      self.fs.pipe_file(self.path, data, mode='create')   # ifGenerationMatch=0
    except (FileExistsError, OSError) as e:
      if isinstance(e, FileExistsError) or '412' in str(e) or 'Precondition' in str(e):
        self.fs.invalidate_cache(self.path)
        return False
      raise
    self.fs.invalidate_cache(self.path)
    return True

  def read(self):
    self.fs.invalidate_cache(self.path)
    try:
      info = self.fs.info(self.path)
      data = self.fs.cat_file(self.path)
    except FileNotFoundError:
      return None, None
    return data, info.get('generation')

  def overwrite(self, data: bytes):
    self.fs.pipe_file(self.path, data)
    self.fs.invalidate_cache(self.path)

  def remove_if(self, version) -> bool:
    try:
      kwargs = {'ifGenerationMatch': str(version)} if version else {}
      self.fs.call('DELETE', 'b/{}/o/{}', self.bucket, self.key, **kwargs)
    except (FileNotFoundError, OSError) as e:
      # gcsfs raises FileExistsError for 412 (the generation changed: another run re-took it).
      if isinstance(e, (FileNotFoundError, FileExistsError)) or '412' in str(e) or (
          'Precondition' in str(e)):
        return False
      raise
    finally:
      self.fs.invalidate_cache(self.path)
    return True


def _pid_alive(pid: int, since: float) -> bool:
  """Whether process `pid` of this host exists and was started no later than `since` + 1 s."""
  try:
    return psutil.Process(pid).create_time() <= since + 1.0
  except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
    return False


class WorkdirLock:
  """The lock of one run on `workdir`. `acquire()`, then `release()` at exit.

  Args:
    workdir: the run's directory (local or gs://).
    stale_s: a lock whose heartbeat is older than this is stale.
    heartbeat_s: seconds between two heartbeats of the owner (0: none, for tests).
  """

  def __init__(self, workdir: str, *, stale_s: float, heartbeat_s: float):
    path = f'{str(workdir).rstrip("/")}/{LOCK_FILE}'
    self.path = path
    self.stale_s = stale_s
    self.heartbeat_s = heartbeat_s
    self._store = _GcsStore(path) if str(workdir).startswith('gs://') else _LocalStore(path)
    now = time.time()
    self.info = {'host': socket.gethostname(), 'pid': os.getpid(),
                 'pid_start_time': psutil.Process().create_time(), 'start_time': now,
                 'heartbeat_time': now, 'run_id': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  def _encode(self) -> bytes:
    return json.dumps(self.info, sort_keys=True).encode()

  def stale_reason(self, owner: dict, now: float) -> Optional[str]:
    """Why the lock `owner` is stale, or None if its owner may be alive."""
    age = now - float(owner.get('heartbeat_time', 0))
    if age > self.stale_s:
      return f'its heartbeat is {age:.0f} s old (> config.workdir_lock_stale_s={self.stale_s})'
    if owner.get('host') == self.info['host'] and not _pid_alive(
        int(owner.get('pid', -1)), float(owner.get('pid_start_time', owner.get('start_time', 0)))):
      return f"its process (pid {owner.get('pid')}) no longer runs on this host"
    return None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock (taking over a stale one), or raises WorkdirLockedError naming the owner."""
    for _ in range(5):
      self.info['heartbeat_time'] = time.time()
      if self._store.create(self._encode()):
        self.held = True
        self._start_heartbeat()
        logging.info('Took the workdir lock %s (run %s).', self.path, self.info['run_id'])
        return self
      data, version = self._store.read()
      if data is None:
        continue   # Released between our create and read: try again.
      now = time.time()
      try:
        owner = json.loads(data)
      except ValueError:   # Being written right now, or garbage: stale only when old.
        owner = {'host': '?', 'pid': -1, 'heartbeat_time': now}
      reason = self.stale_reason(owner, now)
      if reason is None:
        raise WorkdirLockedError(
            f'The workdir is in use by another run ({_describe(owner, now)}): lock {self.path}. '
            'Stop that run, or use another --workdir; a lock whose owner died is taken over '
            'automatically (same host: at once; otherwise after config.workdir_lock_stale_s='
            f'{self.stale_s} s without heartbeat).')
      if self._store.remove_if(version):
        logging.warning('Taking over the stale workdir lock %s of %s: %s.', self.path,
                        _describe(owner, now), reason)
    raise WorkdirLockedError(f'Could not take the workdir lock {self.path} (contended).')

  def _start_heartbeat(self):
    if self.heartbeat_s > 0:
      self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat',
                                      daemon=True)
      self._thread.start()

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        data, _ = self._store.read()
        owner = json.loads(data) if data else {}
        if owner.get('run_id') != self.info['run_id']:
          logging.error('The workdir lock %s is no longer ours (now: %s); another run may be '
                        'writing to this workdir.', self.path,
                        _describe(owner, time.time()) if owner else 'none')
          return
        self.info['heartbeat_time'] = time.time()
        self._store.overwrite(self._encode())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Workdir lock heartbeat failed (%s: %s); retrying.', type(e).__name__, e)

  def release(self):
    """Stops the heartbeat and deletes the lock if it is still ours (never raises)."""
    self._stop.set()
    if not self.held:
      return
    self.held = False
    try:
      data, version = self._store.read()
      if data and json.loads(data).get('run_id') == self.info['run_id']:
        self._store.remove_if(version)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not release the workdir lock %s: %s', self.path, e)


class _NoLock:
  held = False

  def release(self):
    pass


def acquire_for_run(workdir: str, config):
  """Process 0 takes the lock of `workdir`; the others learn the outcome (broadcast) and fail
  alike when it is locked. -> an object with `release()`."""
  lock, error = _NoLock(), None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, stale_s=config.workdir_lock_stale_s,
                         heartbeat_s=config.workdir_lock_heartbeat_s).acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirLockedError(f'Process 0 could not take the workdir lock of {workdir} '
                                 '(another run owns it; see process 0\'s log).')
  if error is not None:
    raise error
  return lock
