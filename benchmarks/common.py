"""What the benchmarks share: the markdown section writer, the command line, machine load, and
step timers. The train state and batch come from basic.train (`init_training`, `random_batch`),
as in the tests."""
import os
import re
import statistics
import sys
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string('out', None, 'Markdown file whose section of this benchmark is '
                           'replaced (or appended) with the results.')


def command(module: str) -> str:
  """The command that ran benchmark `module`, e.g. 'python -m benchmarks.gradcache --out=F'."""
  return ' '.join(['python -m', module, *sys.argv[1:]])


def write_section(path: str, title: str, section: str):
  """Replaces the section `title` ('## ...') of the markdown file `path`, or appends it."""
  text = open(path).read() if os.path.exists(path) else ''
  pattern = re.compile('^' + re.escape(title) + r'\n.*?(?=^## |\Z)', re.M | re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text, count=1)
  else:
    text = text.rstrip('\n') + ('\n\n' if text.strip() else '') + section
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')


def publish(section: str):
  """Prints `section` (its first line is its '## ' title) and writes it into --out if given."""
  print(section)
  if _OUT.value:
    write_section(_OUT.value, section.split('\n', 1)[0], section)


def run(module: str, section_fn):
  """The command line of benchmark `module` (`python -m benchmarks.NAME [--flags]`): parses the
  flags, then publishes `section_fn(command)`, its markdown section (None: nothing to publish)."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    section = section_fn(command(module))
    if section is not None:
      publish(section)
  app.run(main)


def niceness() -> str:
  """', under `nice -n N`' when this process runs at a lower priority, else ''."""
  n = os.nice(0)
  return f', under `nice -n {n}`' if n else ''


def load_average() -> str:
  """'1-min / 5-min / 15-min' load average of the machine, e.g. '1.6 / 1.9 / 1.8'."""
  return ' / '.join(f'{x:.1f}' for x in os.getloadavg())


def step_timer(step, args, rng):
  """Compiles `step(*args, rng)`; -> timer(i): the wall seconds of one more step."""
  import jax  # pylint: disable=g-import-not-at-top  (some benchmarks set up devices first)
  jax.block_until_ready(step(*args, rng))

  def timer(i):
    start = time.perf_counter()
    jax.block_until_ready(step(*args, jax.random.fold_in(rng, i)))
    return time.perf_counter() - start
  return timer


def median_step_s(step, state, batch, rng, repeats: int) -> float:
  """Compiles, then returns the median wall time of `repeats` steps."""
  timer = step_timer(step, (state, batch), rng)
  return statistics.median(timer(i) for i in range(repeats))


def train_step(config, batch_size: int):
  """basic.train's real step of `config` (validated): -> (jitted step, state, host batch, rng,
  model). The state from `train.init_training`, the batch from `train.random_batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  from basic import train  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  model, tx, schedule, state, _ = train.init_training(config)
  step = jax.jit(train.make_train_step(config, model, tx, schedule))
  return step, state, train.random_batch(config, batch_size), jax.random.key(0), model


def fake_cpu_devices(count: int):
  """`count` fake CPU devices for JAX; call before JAX is imported (the loss benchmarks)."""
  if 'jax' in sys.modules:
    raise RuntimeError('fake_cpu_devices must run before JAX is imported.')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={count}')
  os.environ['JAX_PLATFORMS'] = 'cpu'


def argv_int(argv, name: str, default: int) -> int:
  """The value of `--name=N` in `argv` (read before flags are parsed), else `default`."""
  for arg in argv:
    if arg.startswith(f'--{name}='):
      return int(arg.split('=', 1)[1])
  return default
