r"""Runs basic.train on a Cloud TPU VM or pod slice with gcloud: create, install, train, delete.

  python launch/tpu.py --name=basic-s --zone=us-central2-b --accelerator_type=v4-32 \
      --config=configs/basic_s.py --workdir=gs://BUCKET/basic_s [--dry-run] \
      [-- --config.total_steps=1000 ...]

Steps (each one gcloud command; `--dry-run` prints them and runs nothing):
  1. create the TPU VM (`gcloud compute tpus tpu-vm create`), optionally --spot;
  2. copy this repository (a `git archive` of HEAD) to every worker (`scp --worker=all`);
  3. install it with `jax[tpu]` on every worker (`ssh --worker=all`);
  4. run `python3 -m basic.train --config=... --workdir=gs://...` on every worker at once, logs
     streamed here (every worker runs the same command; JAX finds the other workers itself);
  5. delete the TPU VM (unless --keep).
Arguments after `--` are passed to basic.train.
"""
import argparse
import shlex
import subprocess
import sys

JAX_VERSION = '0.10.2'
LIBTPU_URL = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
ARCHIVE = '/tmp/basic_src.tar.gz'
REMOTE_DIR = 'basic'


def _where(args):
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def gcloud_commands(args, train_args=()):
  """-> list of (description, argv) in execution order."""
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  create = [*tpu, 'create', args.name, *_where(args),
            f'--accelerator-type={args.accelerator_type}', f'--version={args.version}']
  if args.spot:
    create.append('--spot')
  install = (f'mkdir -p {REMOTE_DIR} && tar -xzf basic_src.tar.gz -C {REMOTE_DIR} && '
             f'cd {REMOTE_DIR} && pip install -q -e . "jax[tpu]=={JAX_VERSION}" -f {LIBTPU_URL}')
  train = shlex.join(['python3', '-m', 'basic.train', f'--config={args.config}',
                      f'--workdir={args.workdir}', *train_args])
  return [
      ('create the TPU VM', create),
      ('pack the repository', ['git', 'archive', '--format=tar.gz', '-o', ARCHIVE, 'HEAD']),
      ('copy it to every worker', [*tpu, 'scp', ARCHIVE, f'{args.name}:basic_src.tar.gz',
                                   *_where(args), '--worker=all']),
      ('install on every worker', [*tpu, 'ssh', args.name, *_where(args), '--worker=all',
                                   f'--command={install}']),
      ('train on every worker', [*tpu, 'ssh', args.name, *_where(args), '--worker=all',
                                 f'--command=cd {REMOTE_DIR} && {train}']),
      ('delete the TPU VM', [*tpu, 'delete', args.name, *_where(args), '--quiet']),
  ]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--name', required=True, help='TPU VM name.')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default='', help='default: gcloud config.')
  parser.add_argument('--accelerator_type', default='v4-8', help='e.g. v4-8, v4-32, v5p-64.')
  parser.add_argument('--version', default='tpu-ubuntu2204-base', help='TPU VM runtime image.')
  parser.add_argument('--spot', action='store_true', help='create a Spot TPU VM.')
  parser.add_argument('--config', required=True, help='e.g. configs/basic_s.py')
  parser.add_argument('--workdir', required=True, help='gs://bucket/dir (shared by workers).')
  parser.add_argument('--keep', action='store_true', help='do not delete the TPU VM at the end.')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing.')
  parser.add_argument('train_args', nargs=argparse.REMAINDER, help='after `--`: basic.train.')
  args = parser.parse_args(argv)
  if args.train_args[:1] == ['--']:
    args.train_args = args.train_args[1:]
  if not args.workdir.startswith('gs://'):
    parser.error(f'--workdir={args.workdir}: every worker must see it; use a gs:// path.')
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  steps = gcloud_commands(args, args.train_args)
  if args.keep:
    steps = steps[:-1]
  for description, cmd in steps:
    print(f'# {description}\n{shlex.join(cmd)}', flush=True)
    if args.dry_run:
      continue
    status = subprocess.call(cmd)  # Streams the command's output (the workers' logs) here.
    if status:
      if description != 'create the TPU VM' and not args.keep:
        print(f'# {description} failed ({status}); deleting the TPU VM', flush=True)
        subprocess.call(steps[-1][1])
      return status
  return 0


if __name__ == '__main__':
  sys.exit(main())
