"""Multi-host start-up: `jax.distributed.initialize()` when the run spans several processes.

Call `initialize(...)` first thing in `main`, before any JAX computation or device query.

- TPU pod slices: JAX detects the workers itself (TPU_WORKER_HOSTNAMES lists more than one).
- GPU / CPU clusters: pass the coordinator explicitly (the absl flags of basic.train
  `--coordinator_address=HOST:PORT --num_processes=P --process_id=I`), or set the environment
  variables JAX honours (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or
  run under a cluster manager JAX detects (SLURM, Open MPI, Kubernetes) with
  `--num_processes`.
- CPU processes exchange collectives through gloo
  (`jax_cpu_collectives_implementation='gloo'`), set before initialisation; it only affects the
  CPU backend.

A single process on one host needs none of this, and `initialize` does nothing.

Failures (basic/failures.py): a process that jax.distributed has not heard from for
`heartbeat_timeout_s` seconds (config.distributed_heartbeat_timeout_s) is declared dead and the
others are terminated by JAX; a process that raises announces it through the key-value store,
and the others exit within `peer_poll_s` seconds (config.peer_poll_s) with status 3.
"""
import os
from typing import Optional

from absl import logging
import jax

from basic import failures


def _tpu_multihost() -> bool:
  hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def is_multihost(coordinator_address: Optional[str] = None,
                 num_processes: Optional[int] = None) -> bool:
  """Whether this process is one of several (from arguments or the environment)."""
  if coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if num_processes is not None and num_processes > 1:
    return True
  return _tpu_multihost()


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout_s: int = 100,
               peer_poll_s: float = 1.0) -> bool:
  """Calls `jax.distributed.initialize` for a multi-process run; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service, or None (from the
      environment / auto-detected on TPU pods and cluster managers).
    num_processes: total number of processes, or None (auto-detected).
    process_id: this process's index in [0, num_processes), or None (auto-detected).
    heartbeat_timeout_s: a process silent this long is declared dead (the others terminate);
      also the longest a finished process waits for the others in `shutdown`.
    peer_poll_s: seconds between two checks for another process's failure (a
      `basic.failures.PeerWatch` is started; 0 = none).
  """
  if not is_multihost(coordinator_address, num_processes):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                             shutdown_timeout_seconds=int(heartbeat_timeout_s))
  if peer_poll_s > 0:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    failures.start_peer_watch(distributed.global_state.client, jax.process_index(), peer_poll_s)
  logging.info('jax.distributed initialised: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def shutdown():
  """Leaves a multi-process run in order, after a success; a no-op with one process.

  Stops the `PeerWatch`, then calls `jax.distributed.shutdown()`, whose barrier waits (at most
  the `heartbeat_timeout_s` given to `initialize`) until every process has arrived. Called
  explicitly at the end of `main`, before the interpreter's teardown: left to the client's
  destructor during teardown, the barrier ran under the teardown watchdog of
  `failures.run_main` (config.shutdown_timeout_s), and a process that finished first on a loaded
  machine was killed there (status 1) while it waited for a slower peer.
  """
  if not jax.distributed.is_initialized():
    return
  failures.stop_peer_watch()
  jax.distributed.shutdown()
