r"""Benchmarks of the contrastive loss; not part of the test suite.

  python -m basic.bench_loss precision [--out=BENCHMARKS.md]
  python -m basic.bench_loss memory [--loss_devices=512] [--out=BENCHMARKS.md]
  python -m basic.bench_loss speed [--out=BENCHMARKS.md]

`precision`: relative error of the loss value and of its gradients (image and text embeddings,
temperature) against a float64 NumPy reference, for each `config.loss_precision`, at N = 4096,
d = 64 and d = 1024, temperature 0.01, on CLIP-like L2-normalised embeddings (below). This
machine has no TPU, and XLA:CPU computes every float32 matmul in full float32 whatever its
precision, so 'high' and 'default' are emulated as the TPU computes them: 'default' rounds both
matmul operands to bfloat16 (one MXU pass, float32 accumulation); 'high' splits each operand into
a bfloat16 high part and a bfloat16 remainder and sums the three largest products (bf16_3x);
'highest' is the float32 matmul itself. Every matmul of the loss, forward and backward, goes
through the emulation. Section `## Loss precision`.

`memory`: the loss's per-device buffers at BASIC-L's N = 65536 and d = 1024 on --loss_devices
(fake CPU) devices, replicated (every device computes the whole loss with c = 1024, as before)
and sharded (basic.contrastive_sharded, c = min(1024, N / P)): XLA's compiled memory analysis of
the loss's value and gradients alone, beside the term-by-term account. Section `## Loss memory`.

`speed`: one value-and-gradient of the loss on 8 fake CPU devices, replicated vs sharded, at
N = 4096, d = 256 (interleaved rounds; the fastest of each). Section `## Loss sharding speed`.

The CLIP-like embeddings: real image and text embeddings of a trained CLIP are not uniform on the
sphere; they sit in two narrow cones (a shared direction per modality, the "modality gap") with
matching pairs more similar than the rest. Here x_i = normalise(0.5 u + z_i), y_i =
normalise(0.5 v + rho z_i + sqrt(1 - rho^2) e_i) with z, e standard normal / sqrt(d) and u, v
fixed unit vectors with u . v = 0.3, and rho bisected so that the float64 loss at temperature
0.01 is about 1.5, the difficulty of a trained model's batch (a larger rho separates the pairs
more; at d = 1024 an uncalibrated rho = 0.6 gives a loss of 0 and errors that say nothing).
"""
import os
import sys


def _fake_devices_from_argv(argv):
  """`memory` and `speed` need fake CPU devices, set before JAX is imported."""
  if 'jax' in sys.modules or len(argv) < 2 or argv[1] not in ('memory', 'speed'):
    return
  count = 8
  for arg in argv:
    if arg.startswith('--loss_devices='):
      count = int(arg.split('=', 1)[1])
  if argv[1] == 'speed':
    count = 8
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={count}')
  os.environ['JAX_PLATFORMS'] = 'cpu'


if __name__ == '__main__':
  _fake_devices_from_argv(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from basic import bench
from basic import contrastive
from basic import contrastive_sharded
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('loss_devices', 512, '`memory`: devices P (BASIC-L: 512 chips of v5p-1024).')
flags.DEFINE_integer('loss_rounds', 5, '`speed`: interleaved timing rounds.')
FLAGS = flags.FLAGS

_MIB = 2**20


# --- precision ----------------------------------------------------------------------------------


def clip_like_embeddings(n, d, seed=0, rho=0.6):
  """(n, d) float32 image and text embeddings shaped like a trained CLIP's (module docstring)."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=d)
  u /= np.linalg.norm(u)
  w = rng.normal(size=d)
  w -= (w @ u) * u
  w /= np.linalg.norm(w)
  v = 0.3 * u + np.sqrt(1 - 0.3**2) * w
  z = rng.normal(size=(n, d)) / np.sqrt(d)
  e = rng.normal(size=(n, d)) / np.sqrt(d)
  x = 0.5 * u + z
  y = 0.5 * v + rho * z + np.sqrt(1 - rho**2) * e
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return np.float32(x), np.float32(y)


def calibrated_embeddings(n, d, temperature, target_loss, seed=0):
  """`clip_like_embeddings` with the pair correlation rho bisected so that the float64 softmax
  loss at `temperature` is `target_loss` (within 2%): a trained model's difficulty."""
  lo, hi = 0.0, 1.0
  for _ in range(30):
    rho = (lo + hi) / 2
    x, y = clip_like_embeddings(n, d, seed, rho)
    loss = numpy_softmax_value_and_grads(x, y, temperature)[0]
    if abs(loss - target_loss) <= 0.02 * target_loss:
      break
    lo, hi = (rho, hi) if loss > target_loss else (lo, rho)
  return x, y, rho


def numpy_softmax_value_and_grads(x, y, t):
  """float64 reference: loss and d loss / d (x, y, t)."""
  x, y = np.float64(x), np.float64(y)
  n = x.shape[0]
  logits = x @ y.T / t
  row = logits - logits.max(axis=1, keepdims=True)
  row_p = np.exp(row) / np.exp(row).sum(axis=1, keepdims=True)
  col = logits - logits.max(axis=0, keepdims=True)
  col_p = np.exp(col) / np.exp(col).sum(axis=0, keepdims=True)
  row_lse = logits.max(axis=1) + np.log(np.exp(row).sum(axis=1))
  col_lse = logits.max(axis=0) + np.log(np.exp(col).sum(axis=0))
  diag = np.diag(logits)
  loss = (row_lse.sum() + col_lse.sum() - 2 * diag.sum()) / (2 * n)
  d_logits = (row_p + col_p - 2 * np.eye(n)) / (2 * n)
  return loss, (d_logits @ y / t, d_logits.T @ x / t, -np.sum(d_logits * logits) / t)


def _emulated_matmul(a, b, precision='highest'):
  """The TPU's float32 matmul at `precision`, emulated on a full-float32 backend."""
  full = lambda p, q: jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST)
  if precision == 'highest':
    return full(a, b)
  bf16 = lambda p: p.astype(jnp.bfloat16).astype(jnp.float32)
  a_hi, b_hi = bf16(a), bf16(b)
  if precision == 'default':
    return full(a_hi, b_hi)
  a_lo, b_lo = bf16(a - a_hi), bf16(b - b_hi)
  return full(a_hi, b_hi) + full(a_hi, b_lo) + full(a_lo, b_hi)


def precision_rows(n=4096, dims=(64, 1024), temperature=0.01, chunk=512, target_loss=1.5):
  rows = []
  original = contrastive._matmul  # pylint: disable=protected-access
  contrastive._matmul = _emulated_matmul  # pylint: disable=protected-access
  try:
    for d in dims:
      x, y, rho = calibrated_embeddings(n, d, temperature, target_loss, seed=d)
      ref_loss, ref_grads = numpy_softmax_value_and_grads(x, y, temperature)
      sims = np.float64(x) @ np.float64(y).T
      for precision in contrastive.PRECISIONS:
        f = jax.jit(jax.value_and_grad(
            lambda a, b, t, p=precision: contrastive.softmax_loss(
                a, b, t, chunk_size=chunk, precision=p), argnums=(0, 1, 2)))
        loss, grads = f(x, y, np.float32(temperature))
        rel = lambda got, ref: float(np.linalg.norm(np.float64(got) - ref)
                                     / np.linalg.norm(ref))
        rows.append({'d': d, 'precision': precision, 'loss': float(ref_loss),
                     'value': abs(float(loss) - ref_loss) / abs(ref_loss),
                     'd_image': rel(grads[0], ref_grads[0]),
                     'd_text': rel(grads[1], ref_grads[1]),
                     'd_temperature': rel(grads[2], ref_grads[2]),
                     'pos': float(np.mean(np.diag(sims))), 'rho': rho,
                     'neg': float((sims.sum() - np.trace(sims)) / (n * n - n))})
  finally:
    contrastive._matmul = original  # pylint: disable=protected-access
  return rows


def precision_section(command, rows):
  lines = ['## Loss precision', '', f'Command: `{command}`', '',
           'Relative error against a float64 NumPy reference (value: |err| / |loss|; gradients: '
           'L2 norm of the error over the L2 norm of the reference) of the chunked softmax loss '
           '(c = 512), N = 4096, temperature 0.01, CLIP-like embeddings (basic/bench_loss.py: '
           'mean cosine of matching pairs / of the rest given below). `high` and `default` '
           'emulate the TPU MXU (bf16_3x and one bfloat16 pass, float32 accumulation) on '
           'XLA:CPU; `highest` is a float32 matmul. The sharded loss computes the same matmuls '
           'and has the same errors (its difference from the single-device loss is ~1e-7, '
           'tests/test_contrastive_sharded.py).', '',
           '| d | precision | loss | value | d image_emb | d text_emb | d temperature |',
           '| ---: | --- | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f"| {r['d']} | {r['precision']} | {r['loss']:.4f} | {r['value']:.1e} | "
                 f"{r['d_image']:.1e} | {r['d_text']:.1e} | {r['d_temperature']:.1e} |")
  sims = {r['d']: (r['pos'], r['neg'], r['rho']) for r in rows}
  lines += ['', 'Embeddings: pair correlation rho bisected so that the float64 loss is about '
            '1.5 (a trained model\'s difficulty at this batch); mean cosine similarity of '
            'matching pairs / of the rest: ' + '; '.join(
                f'd = {d}: rho {r:.3f}, {p:.3f} / {q:.3f}' for d, (p, q, r) in sims.items())
            + '.']
  return '\n'.join(lines) + '\n'


# --- memory ---------------------------------------------------------------------------------------


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


# --- speed ----------------------------------------------------------------------------------------


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
      f'devices on this 2-core machine (load average {bench._load_average()}), fastest of '
      f'{FLAGS.loss_rounds} interleaved rounds. The 8 "devices" share 2 cores, so the time '
      'measures total work, not parallel speed-up: the sharded loss does 8 x 8 n N d = 8 N^2 d '
      'FLOPs in all against 8 x 10 N^2 d replicated (predicted ratio 0.1).', '',
      '| form | seconds | relative |', '| --- | ---: | ---: |',
      f"| replicated | {r['replicated']:.3f} | 1.00 |",
      f"| sharded | {r['sharded']:.3f} | {r['sharded'] / r['replicated']:.3f} |"]) + '\n'


def main(argv):
  if len(argv) != 2 or argv[1] not in ('precision', 'memory', 'speed'):
    raise app.UsageError('Usage: python -m basic.bench_loss precision|memory|speed [--out=F]')
  command = 'python -m basic.bench_loss ' + ' '.join(sys.argv[1:])
  if argv[1] == 'precision':
    section = precision_section(command, precision_rows())
  elif argv[1] == 'memory':
    section = memory_section(command, memory_rows())
  else:
    section = speed_section(command, speed_rows())
  print(section)
  if FLAGS.out:
    title = section.split('\n', 1)[0]
    bench._write_named_section(FLAGS.out, title, section)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
