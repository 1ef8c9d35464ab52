r"""Loss speed, replicated vs sharded on 8 fake CPU devices; not part of the test suite.

  python -m benchmarks.loss_speed [--out=BENCHMARKS.md]

One value-and-gradient of the loss on 8 fake CPU devices, replicated vs sharded, at N = 4096,
d = 256 (interleaved rounds; the fastest of each), on the CLIP-like embeddings of
benchmarks/loss_precision.py. Section `## Loss sharding speed`.
"""
from benchmarks import common

if __name__ == '__main__':   # Fake CPU devices, before JAX is imported.
  common.fake_cpu_devices(8)

# pylint: disable=g-import-not-at-top,wrong-import-position
import time

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from basic import contrastive
from basic import contrastive_sharded
from benchmarks.loss_precision import clip_like_embeddings
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('loss_rounds', 5, 'Interleaved timing rounds.')
FLAGS = flags.FLAGS

MODULE = 'benchmarks.loss_speed'


def speed_rows(n=4096, d=256, chunk=512):
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  x, y = clip_like_embeddings(n, d)
  rows, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  args = (jax.device_put(x, rows), jax.device_put(y, rows), jax.device_put(np.float32(0.05), rep))

  def replicated(a, b, temp):
    a, b = jax.lax.with_sharding_constraint((a, b), rep)
    return contrastive.softmax_loss(a, b, temp, chunk_size=chunk)

  sharded = lambda a, b, temp: contrastive_sharded.softmax_loss(
      a, b, temp, mesh=mesh, axes='data', chunk_size=min(chunk, n // len(devices)))
  fns = {name: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
         for name, f in (('replicated', replicated), ('sharded', sharded))}
  for f in fns.values():
    jax.block_until_ready(f(*args))
  best = {name: float('inf') for name in fns}
  for _ in range(FLAGS.loss_rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return {'n': n, 'd': d, 'devices': len(devices), **best}


def speed_section(command, r):
  return '\n'.join([
      '## Loss sharding speed', '', f'Command: `{command}`', '',
      f"Softmax loss value and gradients, N = {r['n']}, d = {r['d']}, {r['devices']} fake CPU "
      f'devices on this 2-core machine (load average {common.load_average()}), fastest of '
      f'{FLAGS.loss_rounds} interleaved rounds. The 8 "devices" share 2 cores, so the time '
      'measures total work, not parallel speed-up: the sharded loss does 8 x 8 n N d = 8 N^2 d '
      'FLOPs in all against 8 x 10 N^2 d replicated (predicted ratio 0.1).', '',
      '| form | seconds | relative |', '| --- | ---: | ---: |',
      f"| replicated | {r['replicated']:.3f} | 1.00 |",
      f"| sharded | {r['sharded']:.3f} | {r['sharded'] / r['replicated']:.3f} |"]) + '\n'


if __name__ == '__main__':
  common.run(MODULE, lambda command: speed_section(command, speed_rows()))
