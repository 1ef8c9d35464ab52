"""Optimisers and learning-rate schedules from `config.optimizer` (optax).

Weight decay is decoupled (AdamW) and applied only to matrices/kernels (ndim >= 2): never to
biases, norm scales/offsets, or the temperature. Gradients are clipped by global norm first.
Stacked (layer-scanned) parameters (`basic.sharding.stacked_dims`: a leading layer axis) are
treated per layer, as their unscanned blocks: the mask counts a block's dimensions, and
Adafactor's update clipping takes the RMS of each layer's slice.

'adamw': optax AdamW. 'adafactorw': Adafactor (Shazeer & Stern 2018; factored second moments,
update clipping, optional momentum) with the same decoupled, lr-scaled weight decay as AdamW
(the BASIC paper's optimiser): update = -lr(t) * (adafactor_direction + weight_decay * param).
Unlike `optax.adafactor`, whose `weight_decay_rate` is added after the learning-rate scaling.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from basic import freeze
from basic import sharding

OPTIMIZERS = ('adamw', 'adafactorw')
SCHEDULES = ('cosine', 'linear', 'constant')


def learning_rate_schedule(opt_config, total_steps: int):
  """Linear warmup from 0 to `learning_rate`, then cosine/linear decay to end_lr_ratio * lr."""
  lr = opt_config.learning_rate
  warmup = opt_config.warmup_steps
  end = lr * opt_config.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif opt_config.schedule == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif opt_config.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f'Unknown config.optimizer.schedule {opt_config.schedule!r}.')
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params):
  """True for parameters that get weight decay: arrays with ndim >= 2 (kernels, embeddings),
  not counting the leading layer axes of stacked parameters (a stacked bias [depth, D]: False)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ndim(p) - sharding.stacked_dims(sharding.path_str(path)) >= 2, params)


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
  """optax.clip_by_block_rms with a stacked parameter's layers as separate blocks.

  u <- u / max(1, rms(u) / threshold), rms over one parameter, or over one layer's slice
  [k:] of a parameter with k stacked axes; equal to `optax.clip_by_block_rms` on unscanned
  parameters.
  """
  def clip(path, u):
    axes = tuple(range(sharding.stacked_dims(sharding.path_str(path)), jnp.ndim(u)))
    rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=axes, keepdims=True))
    return u / jnp.maximum(1.0, rms / threshold)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_factoring(params, min_dim_size_to_factor: int):
  """Factored moments act on each layer of a stacked parameter alike only while the layer axis
  is shorter than min_dim_size_to_factor (else it could be factored); ValueError otherwise."""
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding.path_str(path)
    stacked = sharding.stacked_dims(name)
    if stacked and max(jnp.shape(p)[:stacked]) >= min_dim_size_to_factor:
      raise ValueError(f'config.optimizer.min_dim_size_to_factor={min_dim_size_to_factor}: the '
                       f'stacked parameter {name!r} {tuple(jnp.shape(p))} has a layer axis that '
                       'long, which Adafactor would factor across layers; raise it above the '
                       'scanned depth or set config.model.*.scan_layers=False.')


def adafactorw(opt_config, schedule) -> optax.GradientTransformation:
  """Adafactor direction + decoupled weight decay, both scaled by the learning rate.

  Reads from `config.optimizer`: `factored` (factor the second moment of matrices with both
  dims >= `min_dim_size_to_factor`), `decay_rate` (second-moment decay 1 - t^-decay_rate),
  `b1` (momentum; None or 0 = none, the memory-saving default of Adafactor),
  `clipping_threshold` (update clipping by block RMS; None or 0 = off), `eps`,
  `weight_decay` (masked by `weight_decay_mask`).
  """
  min_dim = opt_config.min_dim_size_to_factor
  factored = optax.scale_by_factored_rms(
      factored=opt_config.factored, decay_rate=opt_config.decay_rate,
      min_dim_size_to_factor=min_dim, epsilon=opt_config.eps)
  if opt_config.factored:
    def init_fn(params, inner=factored.init):
      _check_factoring(params, min_dim)
      return inner(params)
    factored = optax.GradientTransformation(init_fn, factored.update)
  chain = [factored]
  if opt_config.clipping_threshold:
    chain.append(clip_by_layer_rms(opt_config.clipping_threshold))
  if opt_config.b1:
    chain.append(optax.ema(opt_config.b1, debias=False))
  if opt_config.weight_decay:
    chain.append(optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain)


def make_optimizer(opt_config, total_steps: int, rules=None):
  """-> (optax.GradientTransformation, schedule fn step -> lr).

  `rules` (basic.freeze.Rules; default: those of `opt_config` alone, `freeze.optimizer_rules`;
  a run passes `freeze.rules(config)`, which adds the locked towers) freezes parameters and
  scales their learning rates (`with_rules`)."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == 'adamw':
    opt = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=weight_decay_mask)
  elif opt_config.name == 'adafactorw':
    opt = adafactorw(opt_config, schedule)
  else:
    raise ValueError(f'Unknown config.optimizer.name {opt_config.name!r}; one of {OPTIMIZERS}.')
  chain = []
  if opt_config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  chain.append(opt)
  tx = optax.chain(*chain)
  rules = freeze.optimizer_rules(opt_config) if rules is None else rules
  return (with_rules(tx, rules) if rules.active else tx), schedule


def with_rules(tx, rules) -> optax.GradientTransformation:
  """`tx` on the trained parameters only, its updates scaled per parameter (basic.freeze).

  chain(zero the gradient of frozen slices, multi_transform({'trained': tx, 'frozen':
  set_to_zero}), multiply by the lr scale (per slice) and the slice mask). So a frozen leaf has
  no optimiser state (optax.MaskedNode: no array), no weight decay, no update, and is left out of
  tx's gradient clipping norm (as are frozen slices, whose gradients are zeroed first). A
  scanned leaf frozen in some slices keeps state for all of them; its frozen slices see zero
  gradients and get zero updates. The lr scale multiplies tx's whole update, decoupled weight
  decay included, as a parameter group's lr does in OpenCLIP / BEiT (update = -lr * scale *
  (direction + wd * p)).
  """
  def masks(tree):
    mask = freeze.trainable(tree, rules)
    scale = freeze.lr_scales(tree, rules)
    return mask, scale

  is_mask = lambda x: isinstance(x, np.ndarray)

  def zero_frozen(updates, state, params=None):
    del params
    mask, _ = masks(updates)
    zeros = jax.tree.map(jnp.zeros_like, updates)
    return freeze.select(mask, updates, zeros), state

  def scale(updates, state, params=None):
    del params
    mask, scales = masks(updates)

    def one(m, sc, u):
      factor = np.asarray(sc, np.float32) * (np.asarray(m, np.float32) if is_mask(m) else 1.0)
      if not np.ndim(factor) and float(factor) == 1.0:
        return u
      return u * jnp.asarray(freeze.per_slice(factor, u), u.dtype)
    return jax.tree.map(one, mask, scales, updates, is_leaf=is_mask), state

  empty = lambda params: optax.EmptyState()
  labels = lambda tree: freeze.label_tree(freeze.trainable(tree, rules))
  return optax.chain(
      optax.GradientTransformation(empty, zero_frozen),
      optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels),
      optax.GradientTransformation(empty, scale))


def ema_update(ema, params, decay: float):
  """One step of the exponential moving average of the parameters (config.ema_decay):
  ema <- d * ema + (1 - d) * params, per leaf, in the EMA's dtype."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
