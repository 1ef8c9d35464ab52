r"""Multi-host on one machine: P processes on 127.0.0.1, each with D fake CPU devices.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/tiny.py --workdir=/tmp/basic_mh --config.total_steps=20

Everything after `--` goes to `python -m basic.train`. Each process gets
`XLA_FLAGS=--xla_force_host_platform_device_count=D` and the coordinator flags
`--coordinator_address=127.0.0.1:PORT --num_processes=P --process_id=I` (a free port), so the run
is a real jax.distributed run (CPU collectives over gloo) with P * D devices, as on a pod.
Output lines are prefixed with `[I]`. If one process fails, the others exit on their own
(basic/failures.py: within config.peer_poll_s, status 3); any still running after `--grace`
seconds are killed. The launcher then prints which process failed first and every exit status;
its own exit status is the first failure's.
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, base=None) -> dict:
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def commands(train_args, num_processes: int, port: int, python=sys.executable):
  """The command line of each process: basic.train with the coordinator flags."""
  return [[python, '-m', 'basic.train', *train_args,
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
           f'--process_id={i}'] for i in range(num_processes)]


def _pump(index, stream, out):
  for line in iter(stream.readline, ''):
    out.write(f'[{index}] {line}')
    out.flush()


def launch(train_args, *, num_processes: int, devices_per_process: int,
           timeout: float = 0.0, grace: float = 30.0) -> int:
  """Runs the processes to completion; -> exit status (0 if all succeeded, else the status of
  the process that failed first; 124 when `timeout` seconds passed)."""
  env = process_env(devices_per_process)
  procs, pumps = [], []
  for i, cmd in enumerate(commands(train_args, num_processes, free_port())):
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pump = threading.Thread(target=_pump, args=(i, proc.stdout, sys.stdout), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  deadline = time.monotonic() + timeout if timeout else None
  status, first, kill_at = 0, None, None
  while any([p.poll() is None for p in procs]):   # A list: poll() every process (returncode).
    if first is None:   # A process that failed, rather than one told of a failure (3).
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      first = min(failed, key=lambda i: procs[i].returncode == 3, default=None)
      if first is not None:
        status = procs[first].returncode
        kill_at = time.monotonic() + grace
    late = deadline is not None and time.monotonic() > deadline
    if late or (kill_at is not None and time.monotonic() > kill_at):
      status = status or 124
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  for p in procs:
    p.wait()
  for pump in pumps:
    pump.join(timeout=5)
  if first is None:
    first = next((i for i, p in enumerate(procs) if p.returncode), None)
  statuses = [p.returncode for p in procs]
  if first is not None:
    print(f'launch/local.py: process {first} failed first (exit status {procs[first].returncode})'
          f'; exit statuses {statuses}.', file=sys.stderr, flush=True)
  return status or (procs[first].returncode if first is not None else 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--timeout', type=float, default=0.0, help='seconds; 0 = none.')
  parser.add_argument('--grace', type=float, default=30.0,
                      help='seconds the others get to exit after one process failed.')
  parser.add_argument('train_args', nargs=argparse.REMAINDER,
                      help='arguments of basic.train, after `--`.')
  args = parser.parse_args()
  train_args = args.train_args[1:] if args.train_args[:1] == ['--'] else args.train_args
  sys.exit(launch(train_args, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, timeout=args.timeout,
                  grace=args.grace))


if __name__ == '__main__':
  main()
