r"""Loss memory per device, replicated vs sharded; not part of the test suite.

  python -m benchmarks.loss_memory [--loss_devices=512] [--out=BENCHMARKS.md]

The loss's per-device buffers at BASIC-L's N = 65536 and d = 1024 on --loss_devices (fake CPU)
devices, replicated (every device computes the whole loss with c = 1024, as before) and sharded
(basic.contrastive_sharded, c = min(1024, N / P)): XLA's compiled memory analysis of the loss's
value and gradients alone, beside the term-by-term account. Section `## Loss memory`.
"""
import sys

from benchmarks import common

if __name__ == '__main__':   # Fake CPU devices, before JAX is imported.
  common.fake_cpu_devices(common.argv_int(sys.argv, 'loss_devices', 512))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from basic import contrastive
from basic import contrastive_sharded
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('loss_devices', 512, 'Devices P (BASIC-L: 512 chips of v5p-1024).')

MODULE = 'benchmarks.loss_memory'
_MIB = 2**20


def _compiled_memory(fn, args, shardings):
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)),
                     in_shardings=shardings).lower(*args).compile()
  m = compiled.memory_analysis()
  return {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
          'temporaries': m.temp_size_in_bytes}


def memory_rows(n=65536, d=1024, chunk=1024):
  devices = jax.devices()
  p = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  emb = jax.ShapeDtypeStruct((n, d), jnp.float32)
  t = jax.ShapeDtypeStruct((), jnp.float32)
  rows_sharding, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def replicated(a, b, temp):
    a, b = jax.lax.with_sharding_constraint((a, b), rep)
    return contrastive.softmax_loss(a, b, temp, chunk_size=chunk)

  c_sharded = min(chunk, n // p)
  sharded = lambda a, b, temp: contrastive_sharded.softmax_loss(
      a, b, temp, mesh=mesh, axes='data', chunk_size=c_sharded)
  shardings = (rows_sharding, rows_sharding, rep)
  return {'devices': p, 'n': n, 'd': d,
          'replicated': {'c': chunk, **_compiled_memory(replicated, (emb, emb, t), shardings)},
          'sharded': {'c': c_sharded, **_compiled_memory(sharded, (emb, emb, t), shardings)}}


def memory_section(command, r):
  n, d, p = r['n'], r['d'], r['devices']
  cr, cs = r['replicated']['c'], r['sharded']['c']
  rows = n // p
  f32 = 4 / _MIB
  terms = [  # (term, replicated MiB, sharded MiB)
      ('own embeddings x_p, y_p (inputs, 2 n d)', 2 * rows * d * f32, 2 * rows * d * f32),
      ('gathered embeddings: x and y (2 N d) / text side Y only (N d)', 2 * n * d * f32,
       n * d * f32),
      ('cotangents: d x, d y (2 N d) / partial d Y before the reduce-scatter (N d) + own '
       'd x_p, d y_p (2 n d)', 2 * n * d * f32, n * d * f32 + 2 * rows * d * f32),
      ('logit blocks: logits, probabilities, product (3 c N)', 3 * cr * n * f32,
       3 * cs * n * f32),
      ('log-sum-exp vectors (2 N / N + n + running max and sum 2 N)', 2 * n * f32,
       (3 * n + rows) * f32),
  ]
  lines = ['## Loss memory', '', f'Command: `{command}`', '',
           f'The contrastive loss alone (value and gradients of the softmax loss), BASIC-L\'s '
           f'N = {n}, d = {d}, float32, on P = {p} fake CPU devices (BASIC-L\'s 512 chips), '
           f'embeddings split over the devices as the gradient-cached step hands them over. '
           f'Replicated: every device gathers both sides and computes the whole loss in '
           f'c = {cr} row blocks (what `make_loss_fn` did before; '
           f'`config.loss_sharding=\'replicated\'`). Sharded: basic.contrastive_sharded, '
           f'n = N / P = {rows} own rows, c = {cs}.', '',
           '| per device, MiB | replicated | sharded |', '| --- | ---: | ---: |']
  for name, a, b in terms:
    lines.append(f'| {name} | {a:.1f} | {b:.1f} |')
  total_a = sum(t[1] for t in terms)
  total_b = sum(t[2] for t in terms)
  lines.append(f'| **sum of the terms** | **{total_a:.1f}** | **{total_b:.1f}** |')
  for key in ('arguments', 'outputs', 'temporaries'):
    lines.append(f"| XLA:CPU memory_analysis: {key} | {r['replicated'][key] / _MIB:.1f} | "
                 f"{r['sharded'][key] / _MIB:.1f} |")
  lines += ['', 'Work per device: replicated 10 N^2 d = '
            f'{10 * n * n * d / 1e12:.1f} TFLOP (two forward passes, recompute, two gradient '
            f'matmuls), sharded 8 n N d = {8 * rows * n * d / 1e12:.3f} TFLOP.']
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(MODULE, lambda command: memory_section(command, memory_rows()))
