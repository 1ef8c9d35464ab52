"""Optimisers and learning-rate schedules from `config.optimizer` (optax).

Weight decay is decoupled (AdamW) and applied only to matrices/kernels (ndim >= 2): never to
biases, norm scales/offsets, or the temperature. Gradients are clipped by global norm first.
"""
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adamw',)
SCHEDULES = ('cosine', 'linear', 'constant')


def learning_rate_schedule(opt_config, total_steps: int):
  """Linear warmup from 0 to `learning_rate`, then cosine/linear decay to end_lr_ratio * lr."""
  lr = opt_config.learning_rate
  warmup = opt_config.warmup_steps
  end = lr * opt_config.get('end_lr_ratio', 0.0)
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
  """True for parameters that get weight decay: arrays with ndim >= 2 (kernels, embeddings)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(opt_config, total_steps: int):
  """-> (optax.GradientTransformation, schedule fn step -> lr)."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == 'adamw':
    opt = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=weight_decay_mask)
  else:
    raise ValueError(f'Unknown config.optimizer.name {opt_config.name!r}; one of {OPTIMIZERS}.')
  chain = []
  if opt_config.get('grad_clip_norm'):
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  chain.append(opt)
  return optax.chain(*chain), schedule
