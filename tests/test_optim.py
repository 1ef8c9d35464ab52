"""Learning-rate schedule values and the weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from basic import optim
from configs import tiny


def test_warmup_cosine_schedule():
  opt = tiny.get_config().optimizer
  opt.learning_rate, opt.warmup_steps, opt.end_lr_ratio = 1e-3, 10, 0.1
  sched = optim.learning_rate_schedule(opt, total_steps=110)
  np.testing.assert_allclose(float(sched(0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(sched(5)), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  # Half-way through the decay: end + (lr - end) * (1 + cos(pi / 2)) / 2.
  np.testing.assert_allclose(float(sched(60)), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)


def test_weight_decay_only_on_matrices():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'ln': {'scale': jnp.ones(4)}, 'log_temperature': jnp.zeros(())}
  mask = optim.weight_decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'ln': {'scale': False},
                  'log_temperature': False}
  opt = tiny.get_config().optimizer
  opt.learning_rate, opt.warmup_steps, opt.weight_decay = 0.1, 0, 0.5
  opt.grad_clip_norm = 0.0
  tx, _ = optim.make_optimizer(opt, total_steps=10)
  zeros = {'dense': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)},
           'ln': {'scale': jnp.zeros(4)}, 'log_temperature': jnp.zeros(())}
  updates, _ = tx.update(zeros, tx.init(params), params)
  # With zero gradients only decoupled weight decay moves parameters: -lr * wd * p.
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  np.testing.assert_allclose(updates['ln']['scale'], 0.0)
  np.testing.assert_allclose(updates['log_temperature'], 0.0)


def _adafactorw_config(**overrides):
  from configs import basic_s  # pylint: disable=import-outside-toplevel
  opt = basic_s.get_config().optimizer
  opt.warmup_steps, opt.grad_clip_norm = 0, 0.0
  opt.update(overrides)
  return opt


def test_adafactorw_step_decreases_loss():
  opt = _adafactorw_config(learning_rate=0.05, weight_decay=1e-4)
  target = jnp.arange(12.0).reshape(3, 4) / 12
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}
  loss = lambda p: jnp.sum((p['w'] + p['b'] - target) ** 2)
  tx, _ = optim.make_optimizer(opt, total_steps=100)
  state = tx.init(params)
  losses = []
  for _ in range(5):
    value, grads = jax.value_and_grad(loss)(params)
    losses.append(float(value))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_adafactorw_weight_decay_is_decoupled_and_masked():
  opt = _adafactorw_config(learning_rate=0.1, weight_decay=0.5, schedule='constant')
  params = {'dense': {'kernel': jnp.full((256, 256), 2.0), 'bias': jnp.ones(256)},
            'ln': {'scale': jnp.ones(4)}, 'log_temperature': jnp.zeros(())}
  tx, _ = optim.make_optimizer(opt, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradients: only the decay moves parameters, by -lr * wd * p (factored kernel too).
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  np.testing.assert_allclose(updates['ln']['scale'], 0.0)
  np.testing.assert_allclose(updates['log_temperature'], 0.0)
