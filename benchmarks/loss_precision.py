r"""Loss precision: errors of the loss and its gradients per config.loss_precision; not part of
the test suite.

  python -m benchmarks.loss_precision [--out=BENCHMARKS.md]

Relative error of the loss value and of its gradients (image and text embeddings, temperature)
against a float64 NumPy reference, for each `config.loss_precision`, at N = 4096, d = 64 and
d = 1024, temperature 0.01, on CLIP-like L2-normalised embeddings (below). This machine has no
TPU, and XLA:CPU computes every float32 matmul in full float32 whatever its precision, so 'high'
and 'default' are emulated as the TPU computes them: 'default' rounds both matmul operands to
bfloat16 (one MXU pass, float32 accumulation); 'high' splits each operand into a bfloat16 high
part and a bfloat16 remainder and sums the three largest products (bf16_3x); 'highest' is the
float32 matmul itself. Every matmul of the loss, forward and backward, goes through the
emulation. Section `## Loss precision`.

The CLIP-like embeddings: real image and text embeddings of a trained CLIP are not uniform on the
sphere; they sit in two narrow cones (a shared direction per modality, the "modality gap") with
matching pairs more similar than the rest. Here x_i = normalise(0.5 u + z_i), y_i =
normalise(0.5 v + rho z_i + sqrt(1 - rho^2) e_i) with z, e standard normal / sqrt(d) and u, v
fixed unit vectors with u . v = 0.3, and rho bisected so that the float64 loss at temperature
0.01 is about 1.5, the difficulty of a trained model's batch (a larger rho separates the pairs
more; at d = 1024 an uncalibrated rho = 0.6 gives a loss of 0 and errors that say nothing).
"""
import jax
import jax.numpy as jnp
import numpy as np

from basic import contrastive
from benchmarks import common

MODULE = 'benchmarks.loss_precision'


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
  """The markdown section `## Loss precision` of `precision_rows`."""
  lines = ['## Loss precision', '', f'Command: `{command}`', '',
           'Relative error against a float64 NumPy reference (value: |err| / |loss|; gradients: '
           'L2 norm of the error over the L2 norm of the reference) of the chunked softmax loss '
           '(c = 512), N = 4096, temperature 0.01, CLIP-like embeddings '
           '(benchmarks/loss_precision.py: mean cosine of matching pairs / of the rest given '
           'below). `high` and `default` '
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


if __name__ == '__main__':
  common.run(MODULE, lambda command: precision_section(command, precision_rows()))
