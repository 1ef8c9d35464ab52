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
"""
import os
from typing import Optional

from absl import logging
import jax


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
               process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` for a multi-process run; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service, or None (from the
      environment / auto-detected on TPU pods and cluster managers).
    num_processes: total number of processes, or None (auto-detected).
    process_id: this process's index in [0, num_processes), or None (auto-detected).
  """
  if not is_multihost(coordinator_address, num_processes):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id)
  logging.info('jax.distributed initialised: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
