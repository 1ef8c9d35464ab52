r"""Trains a dual encoder: `train_and_evaluate(config, workdir)`, a flag-free library.

The command line, `python -m basic.train --config=configs/tiny.py --workdir=DIR`, is basic.main's
(flags, console, exit status); this module's entry point runs it. Running the same command again
resumes from the latest checkpoint in `DIR/checkpoints`. Writes `DIR/metrics.jsonl` (one JSON
object per logged step), TensorBoard events in `DIR`, and checkpoints; evaluates every
`eval_every_steps` and at the end.
"""
import contextlib
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import contrastive_sharded
from basic import flops as flops_lib
from basic import failures
from basic import freeze
from basic import gradcache
from basic import losses
from basic import metric_writers
from basic import models
from basic import optim
from basic import sharding
from basic import tokenizer as tokenizer_lib
from basic import workdir_lock
from basic.data import pipeline
from basic.data import tf_setup
from basic.evaluate import run as evaluate_run
from basic.models import posemb
from basic.models import scan
from basic.models import temperature_from_params

class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/inf (config.on_nonfinite='stop'); the message names
  the step and the last good checkpoint."""


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """A TrainState that also keeps `ema`, the exponential moving average of the parameters
  (config.ema_decay = d > 0; basic.optim.ema_update): a tree like `params`, sharded like them
  (basic.sharding.state_shardings matches it by path and shape), saved in checkpoints.

  ema_0 = params_0 (the initial, or init_from, parameters); after each applied update t,
  ema_t = d * ema_{t-1} + (1 - d) * params_t; a skipped non-finite update leaves it unchanged.
  No warmup of d (timm's ModelEmaV2 / big_vision's min(d, (1 + t) / (10 + t)) is not applied):
  the average starts at the initial parameters, whose weight after t updates is d^t, so choose d
  with 1 / (1 - d) well below the run's length. Runs with ema_decay = 0 keep a plain TrainState
  (no copy of the parameters; checkpoints as before).
  """
  ema: Any


def with_params(state, params):
  """`state` with `params` (e.g. config.init_from's); its EMA, if it keeps one, restarts from a
  copy of them."""
  if isinstance(state, EmaTrainState):
    return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
  return state.replace(params=params)


def loss_axes(config, mesh=None) -> tuple:
  """The mesh axes the contrastive loss's rows are split over; () = not sharded.

  With config.loss_sharding == 'sharded' and a mesh of more than one
  device: 'data' first, then the other axes of size > 1 in mesh order, as long as their device
  count divides config.batch_size (else 'data' alone). The embeddings arrive split over 'data'
  and replicated over the other axes, so splitting their rows further is a local slice.
  """
  if mesh is None or config.loss_sharding == 'replicated':
    return ()
  names = [a for a in mesh.axis_names if mesh.shape[a] > 1]
  axes = tuple(sorted(names, key=lambda a: a != sharding.DATA_AXIS))
  if axes and config.batch_size % contrastive_sharded.num_shards(mesh, axes):
    axes = (sharding.DATA_AXIS,) if sharding.DATA_AXIS in axes else ()
  return axes


def loss_chunk_size(config, mesh=None) -> int:
  """c, the rows of one c x N logit block on each device (0: the unchunked N x N reference).

  config.loss_chunk_size: c > 0 as given (at most the rows a device holds); 0 the unchunked loss
  (with a sharded loss: one n x N block per device, n = N / P); -1 automatic, the largest c
  whose three float32 c x N buffers (logits, probabilities, their product with the cotangent)
  fit config.loss_chunk_budget_mib, a multiple of 128 (or of 8 below 128), at most n, at
  least 1. So no batch size builds an N x N array unless asked for with 0.
  """
  n_global = config.batch_size
  axes = loss_axes(config, mesh)
  rows = n_global // contrastive_sharded.num_shards(mesh, axes)
  c = config.loss_chunk_size
  if c == 0:
    return rows if axes else 0
  if c > 0:
    return min(c, rows)
  c = int(config.loss_chunk_budget_mib * 2**20 // (3 * 4 * n_global))
  if c < rows:
    c = c // 128 * 128 if c >= 128 else max(8 * (c // 8), 1)
  return max(1, min(c, rows))


def make_loss_fn(config, mesh=None):
  """-> loss_fn(params, image_emb [N, d], text_emb [N, d]) -> scalar: `config.loss`, an entry of
  the loss registry (basic.losses), in its sharded, chunked or reference form.

  The global-batch contrastive loss over all N pairs, as in BASIC. With a mesh of more than one
  device (and config.loss_sharding = 'sharded', the default) the loss is sharded
  (basic.contrastive_sharded): each device takes its N / P rows against all N columns, so no
  device repeats another's N x N work. With 'replicated' (or no mesh) the embeddings are gathered
  on every device and each computes the whole loss (basic.contrastive), the reference.
  config.loss_precision ('highest' | 'high' | 'default') sets the logits matmuls' precision; the
  chunk is `loss_chunk_size(config, mesh)`.
  """
  axes = loss_axes(config, mesh)
  chunk = loss_chunk_size(config, mesh)
  precision = config.loss_precision
  num_shards = contrastive_sharded.num_shards(mesh, axes)
  logging.info('Loss: %s over %s, %d rows per device in blocks of c=%d (c x N = %.1f MiB float32'
               '), precision %s.', config.loss,
               f'mesh axes {axes} ({num_shards} devices)' if axes else 'one device (replicated)',
               config.batch_size // num_shards, chunk or config.batch_size,
               (chunk or config.batch_size) * config.batch_size * 4 / 2**20, precision)

  loss = losses.make(config, mesh=mesh, axes=axes, chunk_size=chunk, precision=precision)

  def loss_fn(params, image_emb, text_emb):
    return loss(image_emb, text_emb, temperature_from_params(params, config), params)
  return loss_fn


def make_encode_fn(model, mesh=None):
  """-> encode_fn(params, batch, rng) -> (image_emb, text_emb), dropout drawn from rng.

  With a `mesh`, the model runs inside its abstract mesh, so that the towers' activation
  constraints (`basic.sharding.constrain_batch`) shard the microbatch over the data axis.
  """
  def encode_fn(params, batch, rng):
    context = (contextlib.nullcontext() if mesh is None
               else jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    with context:
      return model.apply({'params': params}, batch['image'], batch['text'], train=True,
                         rngs={'dropout': rng})
  return encode_fn


def make_encode_side_fn(model, mesh=None):
  """-> encode_side(params, batch, rng, side) -> the embeddings of one side ('image' | 'text'),
  equal to that output of `make_encode_fn`'s (flax draws a tower's dropout from its module
  path, so either tower alone draws the same numbers)."""
  def encode_side(params, batch, rng, side):
    context = (contextlib.nullcontext() if mesh is None
               else jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    with context:
      return model.apply({'params': params}, batch[side], train=True, rngs={'dropout': rng},
                         method=f'encode_{side}')
  return encode_side


def make_train_step(config, model, tx, schedule, mesh=None):
  """-> train_step(state, batch, rng) -> (state, metrics), pure; jit it with shardings.

  The gradient is the exact full-batch gradient of the contrastive loss, computed in
  batch_size / microbatch_size microbatches (basic.gradcache). The step's randomness is
  fold_in(rng, state.step), and microbatch k uses fold_in(that, k). With a `mesh`, the loss over
  the whole (data-sharded) batch is sharded over the devices (see `make_loss_fn`).

  metrics['train/nonfinite'] is 1 when the loss or the gradient norm is NaN/inf. With
  config.on_nonfinite == 'skip' such a step leaves params and optimiser state unchanged (the
  step counter still advances); with 'stop' the loop stops (see train_and_evaluate).
  config.debug_nan_at_step = k > 0 makes update k (state.step == k - 1) non-finite, to test
  that guard on a real run.

  With config.ema_decay = d > 0 (an EmaTrainState) the step also updates the EMA of the new
  parameters, ema <- d * ema + (1 - d) * params (basic.optim.ema_update), left unchanged by a
  skipped non-finite update.

  Frozen parameters (basic.freeze: config.optimizer.frozen, config.lock_*) are not
  differentiated (gradcache's `frozen`; their gradients are zeros, also in train/grad_norm), and
  keep their exact values, as does their EMA; a fully locked tower is embedded once per step
  (gradcache's `locked`).
  """
  num_microbatches = config.batch_size // config.microbatch_size
  encode_fn, encode_side = make_encode_fn(model, mesh), make_encode_side_fn(model, mesh)
  loss_fn = make_loss_fn(config, mesh)
  rules = freeze.rules(config)

  nan_at_step = config.debug_nan_at_step
  skip_nonfinite = config.on_nonfinite == 'skip'
  ema_decay = config.ema_decay

  def train_step(state, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    mask = freeze.trainable(state.params, rules) if rules.active else None
    value_and_grad = gradcache.value_and_grad(
        encode_fn, loss_fn, num_microbatches=num_microbatches, unroll=config.gradcache_unroll,
        frozen=None if mask is None else freeze.frozen_leaves(mask),
        locked=freeze.locked_towers(state.params, rules) if mask is not None else (),
        encode_side=encode_side)
    loss, grads = value_and_grad(state.params, batch, step_rng)
    if mask is not None:   # Frozen slices of scanned leaves: differentiated, then zeroed.
      grads = freeze.select(mask, grads, jax.tree.map(jnp.zeros_like, grads))
    if nan_at_step > 0:   # Fault injection (tests of the non-finite guard).
      nan = jnp.where(state.step + 1 == nan_at_step, jnp.nan, 0.0)
      loss = loss + nan
      grads = jax.tree.map(lambda g: g + nan.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if mask is not None:
      params = freeze.select(mask, params, state.params)
    keep = lambda new, old: jnp.where(finite, new, old)
    if skip_nonfinite:
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    new_state = dict(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay > 0:
      ema = optim.ema_update(state.ema, params, ema_decay)
      if mask is not None:   # A frozen parameter's EMA is the parameter itself.
        ema = freeze.select(mask, ema, state.ema)
      new_state['ema'] = jax.tree.map(keep, ema, state.ema) if skip_nonfinite else ema
    metrics = {
        'train/loss': loss,
        'train/temperature': temperature_from_params(params, config),
        'train/learning_rate': schedule(state.step),
        'train/grad_norm': grad_norm,
        'train/param_norm': optax.tree.norm(params),
        'train/nonfinite': 1 - finite.astype(jnp.int32),
    }
    return state.replace(**new_state), metrics
  return train_step


def jit_train_step(config, model, tx, schedule, mesh, state_shardings):
  """`make_train_step` jitted with the real shardings: the state per `state_shardings` (donated),
  the batch over 'data', the rng and metrics replicated. -> jitted (state, batch, rng)."""
  return jax.jit(
      make_train_step(config, model, tx, schedule, mesh),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def init_batch(config, batch_size: int):
  """Dummy inputs of the config's shapes, for init and compilation."""
  size = config.data.image_size
  return {'image': jnp.zeros((batch_size, size, size, 3), jnp.uint8),
          'text': jnp.zeros((batch_size, config.data.text_length), jnp.int32)}


def make_init_fn(config, model, tx):
  """-> init() -> TrainState at step 0 (params from config.seed); jit or eval_shape it.

  With config.ema_decay > 0 an EmaTrainState whose EMA starts at the initial parameters."""
  def init():
    batch = init_batch(config, 2)
    params = model.init(jax.random.key(config.seed), batch['image'], batch['text'])['params']
    step = jnp.zeros((), jnp.int32)
    if config.ema_decay > 0:
      return EmaTrainState(step=step, params=params, opt_state=tx.init(params),
                           ema=jax.tree.map(jnp.copy, params))
    return TrainState(step=step, params=params, opt_state=tx.init(params))
  return init


def abstract_train_state(config, model, tx, mesh):
  """-> (abstract TrainState of ShapeDtypeStructs, its NamedShardings); allocates nothing.

  Parameters are sharded by `config.sharding` (basic.sharding.state_shardings), optimiser
  statistics like their parameters, the rest replicated.
  """
  abstract = jax.eval_shape(make_init_fn(config, model, tx))
  return abstract, sharding.state_shardings(abstract, mesh, config)


def create_train_state(config, model, tx, mesh):
  """Initialises the train state directly with its shardings (no full host copy first)."""
  _, shardings = abstract_train_state(config, model, tx, mesh)
  return jax.jit(make_init_fn(config, model, tx), out_shardings=shardings)(), shardings


def init_training(config, mesh=None):
  """What a run builds before its loop (benchmarks and tests build the same):
  -> (model, tx, schedule, state at step 0, state shardings); `mesh` defaults to config.mesh's."""
  model = models.build(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps, freeze.rules(config))
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  state, shardings = create_train_state(config, model, tx, mesh)
  return model, tx, schedule, state, shardings


def random_batch(config, batch_size: int, seed: int = 0) -> dict:
  """Host inputs of the config's shapes with random values: {'image': uint8 [n, S, S, 3],
  'text': int32 [n, L] ids in [1, model.text.vocab_size)}."""
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.data.text_length
  return {'image': rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
          'text': rng.integers(1, config.model.text.vocab_size, (batch_size, length),
                               dtype=np.int32)}


class PreemptionWatch:
  """SIGTERM (a TPU VM's notice before maintenance) -> stop after the current step and save.

  Single process: a SIGTERM handler sets a flag. Several processes: JAX's preemption sync
  manager (started by jax.distributed.initialize) makes every process agree on the same step
  (`multihost_utils.reached_preemption_sync_point`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: finishing the current step, saving a checkpoint, exiting.')
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def params_from_checkpoint(path: str, params, patterns=()):
  """The parameters of the checkpoint at `path` (a workdir, checkpoints dir or step dir, local or
  gs://), adapted to the structure, shapes and shardings of `params`: scanned or unscanned layers
  as `params` has them (basic.models.scan.to_layout), position embeddings resized to a new grid
  or text length (basic.models.posemb).

  `patterns` (config.init_from_params): regexes fully matching '/'-joined paths of `params` as
  the model names them ('image/encoder/block03/attn/query/kernel'; a scanned module's stacked
  parameter is one path). Only the matching parameters are taken from the checkpoint (which
  needs nothing else: e.g. its text tower may have other sizes); the others keep their values in
  `params` (the fresh initialisation). () = all.

  Raises:
    ConfigError naming config.init_from_params if one of `patterns` matches no parameter.
  """
  names = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  for pattern in patterns:
    if not any(posemb.matches(name, (pattern,)) for name in names):
      raise config_lib.ConfigError(
          f'config.init_from_params={tuple(patterns)!r}: {pattern!r} matches no parameter of '
          f'the model (paths such as {names[0]!r}, fully matched).')
  wanted = posemb.select(params, patterns)
  with checkpoint_lib.open_step(path, field='config.init_from') as (ckpt, step):
    loaded = posemb.adapt_params(scan.to_layout(ckpt.restore_params(step), wanted), wanted)
  taken = sharding.put_whole(loaded, jax.tree.map(lambda p: p.sharding, wanted))
  taken_names = [n for n in names if posemb.matches(n, patterns)]
  logging.info('init_from: took %d of %d parameters (%d of %d values) from %s step %d: %s%s.',
               len(taken_names), len(names), sum(x.size for x in jax.tree.leaves(wanted)),
               sum(x.size for x in jax.tree.leaves(params)), path, step,
               ', '.join(taken_names[:5]), ', ...' if len(taken_names) > 5 else '')
  if len(taken_names) < len(names):
    fresh = [n for n in names if not posemb.matches(n, patterns)]
    logging.info('init_from: %d parameters keep their fresh initialisation: %s%s.', len(fresh),
                 ', '.join(fresh[:5]), ', ...' if len(fresh) > 5 else '')
  return posemb.merge(params, taken)


def _resume_data(data: dict, config, step: int):
  """-> (this host's input-stream cursor, skipped, rng) from a checkpoint's data item."""
  rng = jax.random.key(config.seed + 1)
  if 'rng' in data:
    rng = jax.random.wrap_key_data(np.asarray(data['rng'], np.uint32))
  return (checkpoint_lib.host_cursor(data, step), data.get('nonfinite_skipped', 0), rng)


def check_resume_config(ckpt, config):
  """The config saved with the newest checkpoint in `ckpt` against `config`, before anything is
  compiled: ConfigError naming each changed field that shapes the state or the data stream
  (config_lib.resume_diff, rules in config_lib.RESUME_RULES); the allowed changes are logged.
  -> the step whose config was compared, or None (no checkpoint: a fresh run)."""
  for step in reversed(ckpt.all_steps()):
    try:
      saved = ckpt.restore_config(step)
    except Exception as e:  # pylint: disable=broad-except  (corrupt: restore_latest decides)
      logging.warning('Cannot read the config of checkpoint step %d (%s); trying the previous.',
                      step, e)
      continue
    diff = config_lib.resume_diff(saved, config)
    if diff['allowed']:
      logging.warning('Resuming from step %d with a changed config: %s.', step, '; '.join(
          f'config.{k}: {a!r} -> {b!r}' for k, a, b in diff['allowed']))
    if diff['added'] or diff['removed']:
      logging.info('Config fields new since checkpoint step %d: %s; no longer present: %s.',
                   step, diff['added'] or 'none', diff['removed'] or 'none')
    return step
  return None


def check_resume_tokenizer(ckpt, step, tokenizer, config):
  """The tokenizer of a resumed run must be the one saved with checkpoint `step` (when it has
  one): a moved file is fine, other contents fail naming config.tokenizer.model_path."""
  if step is None:
    return
  try:
    saved = ckpt.restore_tokenizer(step)
  except Exception:  # pylint: disable=broad-except  (corrupt step: restore_latest decides)
    return
  if saved is not None and saved != tokenizer.serialized_model:
    raise config_lib.ConfigError(
        f'config.tokenizer.model_path={config.tokenizer.model_path!r}: this tokenizer differs '
        f'from the one saved with checkpoint step {step} in {ckpt.directory}; resume with that '
        'one (empty model_path in a workdir that holds it, or the same file).')


class TrainLoop:
  """The training loop's state and its periodic actions (log, save, evaluate), for
  `train_and_evaluate`'s loop.

  Attributes:
    state: the TrainState (the loop assigns each step's new state).
    step: the number of finished steps.
    rng: the base rng of the steps (saved with each checkpoint).
    skipped: non-finite updates skipped so far (config.on_nonfinite='skip').
    last_good: the newest checkpoint step written (or restored), None before the first.
  """

  def __init__(self, config, *, state, rng, skipped: int, last_good, ckpt, writer, train_iter,
               tokenizer, evaluator, mesh, step_model_flops, peak_flops):
    self.config, self.state, self.rng = config, state, rng
    self.step, self.skipped, self.last_good = int(state.step), skipped, last_good
    self._ckpt, self._writer, self._train_iter = ckpt, writer, train_iter
    self._tokenizer, self._evaluator, self._mesh = tokenizer, evaluator, mesh
    self._step_model_flops, self._peak_flops = step_model_flops, peak_flops
    self._pending = []   # (step, non-finite flag) of the steps not checked yet.
    self._window = []    # The metrics of the steps since the last log.
    self._window_start, self._window_first_step = time.perf_counter(), self.step

  def finished_step(self, metrics) -> int:
    """Records a finished step's metrics (device arrays, not waited for); -> the step count."""
    self.step += 1
    self._pending.append((self.step, metrics['train/nonfinite']))
    self._window.append(metrics)
    return self.step

  def check_finite(self):
    """Checks the pending steps' non-finite flags: raises at the first non-finite step
    (on_nonfinite='stop'), or counts them (on_nonfinite='skip')."""
    bad = [s for s, flag in self._pending if int(flag)]
    self._pending.clear()
    if bad and self.config.on_nonfinite == 'skip':
      self.skipped += len(bad)
      logging.warning('Non-finite loss or gradient at steps %s: updates skipped (%d so far).',
                      bad, self.skipped)
    elif bad:
      self._ckpt.wait()
      where = (f'the last good checkpoint is step {self.last_good} in {self._ckpt.directory}'
               if self.last_good is not None else 'no checkpoint was written yet')
      raise NonFiniteLossError(f'Non-finite loss or gradient norm at step {bad[0]}; {where}.')

  def log(self):
    """Writes the mean metrics of the steps since the last log, throughput and MFU."""
    self.check_finite()
    window = jax.device_get(self._window)
    scalars = {k: float(np.nanmean([m[k] for m in window]))
               if any(np.isfinite(m[k]) for m in window) else float('nan')
               for k in window[0] if k != 'train/nonfinite'}
    steps, elapsed = self.step - self._window_first_step, time.perf_counter() - self._window_start
    scalars['train/images_per_sec'] = steps * self.config.batch_size / elapsed
    scalars.update(flops_lib.mfu(self._step_model_flops, steps, elapsed, self._mesh.devices.size,
                                 self._peak_flops))
    scalars['train/nonfinite_skipped'] = self.skipped
    cursor = self._train_iter.state()
    streams = cursor.get('streams') or {}   # A data mixture: its components' drops too.
    names = sorted(streams)
    dropped = checkpoint_lib.gather_host_values(
        [cursor['dropped']] + [streams[n]['dropped'] for n in names]).sum(0)
    scalars['data/dropped'] = int(dropped[0])
    scalars.update({f'data/dropped/{n}': int(d) for n, d in zip(names, dropped[1:])})
    self._writer.write_scalars(self.step, scalars)
    self._window = []
    self._window_start, self._window_first_step = time.perf_counter(), self.step

  def save(self):
    """Starts saving the current step: state, config, input-stream cursor, rng, tokenizer."""
    self.check_finite()
    data = checkpoint_lib.stream_item(self._train_iter.state(), nonfinite_skipped=int(self.skipped),
                                      rng=np.asarray(jax.random.key_data(self.rng)).tolist())
    self._ckpt.save(self.step, self.state, self.config, data=data,
                    tokenizer_model=self._tokenizer.serialized_model,
                    tokenizer_kind=self._tokenizer.kind)
    self.last_good = self.step

  def evaluate(self) -> dict:
    """The config's evaluators on the current parameters, written at the current step; with an
    EMA (config.ema_decay > 0) also on the EMA, each task's metrics named with '_ema' after the
    task ('zeroshot_ema/top1' beside 'zeroshot/top1')."""
    results = self._evaluator(self.state.params, self._tokenizer, step=self.step)
    if isinstance(self.state, EmaTrainState):
      results.update(self._evaluator(self.state.ema, self._tokenizer, step=self.step,
                                     suffix='_ema'))
    if results:
      self._writer.write_scalars(self.step, results)
    return results


class StepProfiler:
  """A jax.profiler trace of the steps config.profile_steps = (start, count): steps start ..
  start + count - 1, numbered as logged (step k is the k-th update), written to
  `{workdir}/profile` (jax writes `plugins/profile/<time>/<host>.xplane.pb` there, which
  TensorBoard's profile plugin lists with --logdir={workdir}), by process 0 or, with
  config.profile_all_processes, by every process. The trace starts before the first of those
  steps is dispatched and stops once the last one's outputs are ready; a run that resumes inside
  the range traces the rest of it, a run that ends (or fails) inside it stops the trace there.
  profile_steps = () (the default): nothing is traced or written.

  Use: `with StepProfiler(config, workdir) as p: ... p.before(k); step k; p.after(k, outputs)`.
  """

  def __init__(self, config, workdir: str):
    steps = tuple(config.profile_steps)
    self._first, self._last = (steps[0], steps[0] + steps[1] - 1) if steps else (1, 0)
    self._on = bool(steps) and (jax.process_index() == 0 or config.profile_all_processes)
    self.directory = str(epath.Path(workdir) / 'profile')
    self.active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()

  def before(self, step: int):
    """Called before step `step` (1-based) is dispatched: starts the trace at the range."""
    if self._on and not self.active and self._first <= step <= self._last:
      logging.info('Profiling steps %d to %d into %s.', step, self._last, self.directory)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs=None):
    """Called after step `step` was dispatched: at the range's end, waits for `outputs`, stops."""
    if self.active and step >= self._last:
      self.stop(outputs)

  def stop(self, outputs=None):
    if self.active:
      self.active = False
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      logging.info('Wrote the profile trace to %s.', self.directory)


class _Run:
  """The resources of a run that an exception must shut down, in order (train_and_evaluate)."""

  def __init__(self):
    self.train_iter = self.ckpt = self.writer = None

  def shut_down_after(self, error: BaseException, timeout_s: float):
    """The in-flight checkpoint save (single process; not after a failed save) and the metric
    writers, within `timeout_s` in all. The input pipeline is left alone: dropping a busy
    tf.data iterator waits for the batch in production (see basic.failures)."""
    deadline = time.monotonic() + timeout_s
    left = lambda: max(1.0, deadline - time.monotonic())
    logging.error('Shutting down after %s: %s', type(error).__name__, error)
    if (self.ckpt is not None and jax.process_count() == 1 and
        not isinstance(error, checkpoint_lib.CheckpointWriteError)):
      failures.run_bounded(self.ckpt.wait, left(), 'checkpoint save')
    if self.writer is not None:
      failures.run_bounded(self.writer.flush, left(), 'metric writers')


def train_and_evaluate(config, workdir: str, *, tensorboard_dir=None) -> dict:
  """Runs (or resumes) training in `workdir` (local or gs://); returns the final evaluation.

  Resuming restores the newest readable checkpoint (a corrupt newer one is skipped, see
  basic.checkpoint): the train state, this host's input-stream position and the rng, so the
  resumed run continues exactly as an uninterrupted one. The checkpoint's config is compared
  with `config` first, before anything is compiled (`check_resume_config`).

  The run holds the workdir's lock (basic.workdir_lock): a second run on the same workdir fails
  at once, naming this one. An exception shuts the run down in order before it propagates
  (`_Run.shut_down_after`, within config.shutdown_timeout_s); `main` then exits the process
  (basic.failures).
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lock = workdir_lock.acquire_for_run(workdir, config)
  run = _Run()
  try:
    return _train_and_evaluate(config, workdir, run, tensorboard_dir=tensorboard_dir)
  except BaseException as error:
    run.shut_down_after(error, config.shutdown_timeout_s)
    raise
  finally:
    run.train_iter = None   # On success: dropped (an idle pipeline) while the interpreter lives.
    lock.release()


def _train_and_evaluate(config, workdir: str, run: _Run, *, tensorboard_dir=None) -> dict:
  """train_and_evaluate's body; registers its resources in `run`."""
  tf_setup.configure_tensorflow()   # Before any TF op: no accelerators, few threads.
  num_processes = jax.process_count()
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate(config, num_processes=num_processes,
                      num_data_devices=mesh.shape[sharding.DATA_AXIS])
  workdir_path = epath.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  ckpt = run.ckpt = checkpoint_lib.Checkpointer(
      str(workdir_path / 'checkpoints'), max_to_keep=config.keep_checkpoints,
      keep_period=config.keep_checkpoint_every_steps,
      debug_fail_at_step=config.debug_fail_checkpoint_at_step)
  resume_step = check_resume_config(ckpt, config)   # Before config.json and any compilation.
  if jax.process_index() == 0:
    (workdir_path / 'config.json').write_text(config_lib.to_json(config))

  tok_path = tokenizer_lib.ensure_tokenizer(config, workdir)
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, tok_path, config.data.text_length)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.text.vocab_size={config.model.text.vocab_size}: smaller than the '
        f'tokenizer vocabulary ({tokenizer.vocab_size}, {tok_path}).')
  check_resume_tokenizer(ckpt, resume_step, tokenizer, config)

  model, tx, schedule, state, state_shardings = init_training(config, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %d parameters (%.2fM).', num_params, num_params / 1e6)

  last_good, state = ckpt.restore_latest(state)
  data_state = {}
  if last_good is not None:
    data_state = ckpt.restore_data(last_good)
    logging.info('Resumed from checkpoint step %d in %s.', last_good, ckpt.directory)
  elif config.init_from:
    state = with_params(state, params_from_checkpoint(config.init_from, state.params,
                                                      tuple(config.init_from_params)))
    logging.info('Initialised the parameters from %s.', config.init_from)
  start_step = int(state.step)
  cursor, skipped, rng = _resume_data(data_state, config, start_step)

  writer = metric_writers.create_writer(workdir, start_step=start_step,
                                        tensorboard_dir=tensorboard_dir, config=config)
  if start_step == 0:
    writer.write_hparams({'num_params': num_params, **{
        k: v for k, v in config_lib.flatten(config).items() if isinstance(v, (int, float, str))}})

  train_step = jit_train_step(config, model, tx, schedule, mesh, state_shardings)
  # Model FLOPs of one step from compiled forwards (basic.flops), for train/mfu; the peak of a
  # device from the chip table by device kind, else config.peak_flops_per_device (0: none).
  step_model_flops = flops_lib.model_flops(
      config, state.params, encode_fn=make_encode_fn(model), make_loss_fn=make_loss_fn,
      init_batch=init_batch)
  peak_flops = flops_lib.peak_flops_per_device(config, list(mesh.devices.flat))
  train_iter = pipeline.TrainIterator(config, tokenizer, process_index=jax.process_index(),
                                      process_count=num_processes, state=cursor)
  evaluator = evaluate_run.Evaluator(config, model, mesh)   # Fails now if its data is missing.
  run.writer, run.train_iter = writer, train_iter
  raise_at = config.debug_raise_at_step
  raise_here = config.debug_raise_process in (-1, jax.process_index())

  loop = TrainLoop(config, state=state, rng=rng, skipped=skipped, last_good=last_good,
                   ckpt=ckpt, writer=writer, train_iter=train_iter, tokenizer=tokenizer,
                   evaluator=evaluator, mesh=mesh, step_model_flops=step_model_flops,
                   peak_flops=peak_flops)
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  results = {}
  with PreemptionWatch() as preemption, StepProfiler(config, workdir) as profiler:
    while loop.step < config.total_steps:
      profiler.before(loop.step + 1)
      with jax.profiler.StepTraceAnnotation('train', step_num=loop.step):
        batch = sharding.global_batch(next(train_iter), mesh)
        if loop.step + 1 == raise_at and raise_here:   # Fault injection (crash handling tests).
          raise RuntimeError(f'config.debug_raise_at_step={raise_at}: injected failure at step '
                             f'{loop.step + 1} on process {jax.process_index()}.')
        loop.state, metrics = train_step(loop.state, batch, loop.rng)
      step = loop.finished_step(metrics)
      profiler.after(step, metrics)
      report(step)
      preempted = preemption.should_stop(step)
      is_last = step == config.total_steps or preempted
      if step % config.log_every_steps == 0 or is_last:
        loop.log()
      if step % config.checkpoint_every_steps == 0 or is_last:
        loop.save()
      if preempted:
        logging.warning('Preempted: saved step %d in %s; rerun the same command to resume.',
                        step, ckpt.directory)
        break
      if step % config.eval_every_steps == 0 or is_last:
        results = loop.evaluate()
  if start_step == config.total_steps:  # Already finished: evaluate the restored state.
    results = loop.evaluate()
  ckpt.wait()
  ckpt.close()
  writer.close()   # Everything that writes is closed here: `main` exits without a teardown.
  return results



if __name__ == '__main__':   # `python -m basic.train`: the command line lives in basic.main.
  from basic import main as main_lib  # pylint: disable=g-import-not-at-top
  main_lib.run()
