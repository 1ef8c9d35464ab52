"""What a run does when it fails: it exits, promptly, with a status that says who failed.

A Python exception that propagates out of `main` would normally end in interpreter shutdown,
which destroys the tf.data iterators; the destructor of a prefetch iterator waits for its
producer thread, and a producer running Python (the synthetic source, the CLIP BPE tokenizer:
`tf.numpy_function`) can no longer take the GIL once finalisation has begun, so the process
hangs forever (seen: 12 minutes, then killed by hand). So `run_main` never lets an exception
reach interpreter shutdown:

  1. a native watchdog is armed (`faulthandler.dump_traceback_later(exit=True)`: a C thread
     that needs no GIL): if anything below takes longer than `timeout_s`, the stacks of all
     threads are dumped to stderr and the process exits with status 1;
  2. the traceback is logged, naming this process;
  3. with several processes, the failure is announced to the others through the
     jax.distributed key-value store (see `PeerWatch`);
  4. logs and stdout / stderr are flushed, and the process exits with `os._exit(EXIT_FAILED)`.

Resources owned by the training loop (the input pipeline, an in-flight asynchronous checkpoint
save, the metric writers) are shut down in order by `basic.train.train_and_evaluate` before the
exception leaves it, each step bounded by `run_bounded`.

Several processes: each process runs a `PeerWatch`, a daemon thread that polls the key
`basic/failed/` of the jax.distributed key-value store every `poll_s` seconds. A process that
fails writes `basic/failed/{index}` (its exception, one line) and exits EXIT_FAILED; the others
log "process I failed: ..." and exit EXIT_PEER_FAILED. Process 0 hosts the coordinator, whose
end makes JAX abort the other processes, so process 0 leaves last: failing, it waits `2 * poll_s`
for the others to read its key; told of another's failure, it waits `2 * poll_s` as well, so the
failing process exits first, with its own status. A watcher that cannot reach the coordinator
any more (process 0 died, e.g. by kill -9) exits EXIT_PEER_FAILED as well. A process killed
without a word is also caught by jax.distributed's heartbeat (`heartbeat_timeout_s`, see
basic/multihost.py), which terminates the others.

Exit statuses: 0 success, EXIT_FAILED (1) this process raised (or the watchdog fired),
EXIT_PEER_FAILED (3) another process of the run failed.
"""
import faulthandler
import logging as std_logging
import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from absl import logging

EXIT_FAILED = 1
EXIT_PEER_FAILED = 3
FAILED_KEY = 'basic/failed/'


def flush_all():
  """Flushes absl / std logging handlers and stdout / stderr (never raises)."""
  for handler in list(std_logging.getLogger().handlers) + [logging.get_absl_handler()]:
    try:
      handler.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass


def arm_watchdog(timeout_s: float):
  """Exits the process (status 1, all thread stacks dumped to stderr) after `timeout_s` seconds
  unless `disarm_watchdog` is called first. Works during interpreter shutdown too."""
  faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.__stderr__)


def disarm_watchdog():
  faulthandler.cancel_dump_traceback_later()


def run_bounded(fn: Callable[[], object], timeout_s: float, what: str) -> bool:
  """Runs `fn()` in a daemon thread for at most `timeout_s` seconds; -> whether it finished.

  An exception of `fn` is logged (not raised); a `fn` still running after `timeout_s` is
  abandoned with a warning (used for the shutdown steps after a failure, which must not hang).
  """
  done = threading.Event()

  def target():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Shutdown step %r failed: %s: %s', what, type(e).__name__, e)
    finally:
      done.set()

  threading.Thread(target=target, name=f'shutdown-{what}', daemon=True).start()
  if not done.wait(timeout_s):
    logging.warning('Shutdown step %r did not finish within %.0f s; abandoned.', what, timeout_s)
    return False
  return True


def _one_line(error: BaseException, limit: int = 500) -> str:
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'


class PeerWatch:
  """Announces this process's failure to the others and exits when another one failed.

  Args:
    client: the jax.distributed client (`jax._src.distributed.global_state.client`).
    process_index: this process's index.
    poll_s: seconds between two reads of the failure keys.
  """

  def __init__(self, client, process_index: int, poll_s: float):
    self._client = client
    self._index = process_index
    self.poll_s = poll_s
    self._stop = threading.Event()
    self._announced = False
    self._thread = threading.Thread(target=self._run, name='peer-watch', daemon=True)

  def start(self) -> 'PeerWatch':
    self._thread.start()
    return self

  def stop(self):
    """Stops watching (before a clean jax.distributed shutdown, which other processes' exits
    would otherwise look like a failure to)."""
    self._stop.set()

  def announce(self, error: BaseException):
    """Writes `basic/failed/{index}` = a one-line description of `error` (never raises)."""
    self._announced = True
    try:
      self._client.key_value_set(f'{FAILED_KEY}{self._index}', _one_line(error),
                                 allow_overwrite=True)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not announce the failure to the other processes: %s', e)

  def failed_peer(self) -> Optional[tuple[str, str]]:
    """(index, message) of another process that announced a failure, or None."""
    try:
      failed = self._client.key_value_dir_get(FAILED_KEY)
    except Exception:  # pylint: disable=broad-except
      return None
    others = sorted((k.rsplit('/', 1)[-1], v) for k, v in failed
                    if not k.endswith(f'/{self._index}'))
    return others[0] if others else None

  def _run(self):
    while not self._stop.wait(self.poll_s):
      try:
        failed = self._client.key_value_dir_get(FAILED_KEY)
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set() or self._announced:
          return
        self._exit(f'the jax.distributed coordinator (process 0) is unreachable '
                   f'({_one_line(e, 200)}): process 0 failed or was killed')
        return
      others = [(k, v) for k, v in failed if not k.endswith(f'/{self._index}')]
      if others and not self._stop.is_set() and not self._announced:
        key, message = sorted(others)[0]
        self._exit(f'process {key.rsplit("/", 1)[-1]} failed: {message}')
        return

  def _exit(self, why: str):
    arm_watchdog(30)
    logging.error('Process %d exits (status %d) because %s.', self._index, EXIT_PEER_FAILED, why)
    print(f'Process {self._index} exits because {why}.', file=sys.stderr)
    flush_all()
    if self._index == 0:   # The coordinator leaves last (module docstring).
      time.sleep(2 * self.poll_s)
    os._exit(EXIT_PEER_FAILED)  # pylint: disable=protected-access


_peer_watch: Optional[PeerWatch] = None


def start_peer_watch(client, process_index: int, poll_s: float) -> PeerWatch:
  """Starts the process-wide `PeerWatch` (multi-process runs; see basic/multihost.py)."""
  global _peer_watch
  if _peer_watch is None:
    _peer_watch = PeerWatch(client, process_index, poll_s).start()
  return _peer_watch


def stop_peer_watch():
  if _peer_watch is not None:
    _peer_watch.stop()


def run_main(fn: Callable[[], object], *, timeout_s: float,
             process_index: Callable[[], int] = lambda: 0, exit_on_success: bool = False):
  """Runs `fn()`; on any exception exits the process non-zero within about `timeout_s` s.

  On success: with `exit_on_success`, logs and stdout / stderr are flushed and the process
  exits 0 at once (`os._exit(0)`), skipping the interpreter's teardown; `fn` must have closed
  everything that writes (checkpoints, metric writers, the distributed runtime) itself. The
  teardown is skipped because it is where tf.data's iterator destructors wait for producers
  that need the GIL (module docstring): seen in CI as a successful 2-process run whose processes
  were still in native teardown 10-20 s after their last line, on a loaded machine. Otherwise
  returns what `fn` returns, with the watchdog armed (the teardown that follows must end within
  `timeout_s`; a hang there exits with status 1). See the module docstring for the failure path.
  """
  try:
    result = fn()
  except BaseException as error:  # pylint: disable=broad-except
    if isinstance(error, SystemExit) and error.code in (None, 0):
      raise
    arm_watchdog(timeout_s)
    status = EXIT_FAILED
    try:
      index = process_index()
    except Exception:  # pylint: disable=broad-except
      index = 0
    text = ''.join(traceback.format_exception(error))
    peer = _peer_watch.failed_peer() if _peer_watch is not None else None
    if peer is not None:   # A consequence (say, a collective broken by the peer's exit).
      status = EXIT_PEER_FAILED
      logging.error('Process %d failed after process %s had failed (%s); exit status %d:\n%s',
                    index, peer[0], peer[1], status, text)
    else:
      logging.error('Process %d failed (exit status %d):\n%s', index, status, text)
      print(f'Process {index} failed: {_one_line(error)}', file=sys.stderr)
    if _peer_watch is not None:
      if peer is None:
        _peer_watch.announce(error)
      flush_all()
      if index == 0:   # The others read the key while the coordinator (process 0) lives.
        time.sleep(2 * _peer_watch.poll_s)
    flush_all()
    os._exit(status)  # pylint: disable=protected-access
  stop_peer_watch()
  arm_watchdog(timeout_s)
  if exit_on_success:
    flush_all()
    os._exit(0)  # pylint: disable=protected-access
  return result
