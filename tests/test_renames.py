"""Checkpoints written before the Transformer MLP's layers were named ('Dense_0' / 'Dense_1',
now 'fc1' / 'fc2'; basic.models.renames) still restore: the train state a run resumes from, the
parameters inference and init_from read, and the config with its sharding rules.

The old checkpoint is made as the previous version wrote it: the current train state with its
names mapped back (renames.downgrade; the map is checked against a hand-written tree below), and
a config in the old layout (rules naming 'mlp/Dense_0', fields added since left out)."""
import jax
import ml_collections
import numpy as np

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic import optim
from basic import sharding
from basic import train
from basic.models import build as build_model
from basic.models import renames
import config_helpers

_OLD_RULES = (('attn/(query|key|value)/kernel$', (None, 'model', None)),
              ('mlp/Dense_0/kernel$', (None, 'model')),
              ('mlp/Dense_0/bias$', ('model',)),
              ('mlp/Dense_1/kernel$', ('model', None)))


def _config():
  return config_helpers.tiny_config({'model.image.depth': 1, 'model.text.depth': 2})


def _state(config):
  model = build_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  state, _ = train.create_train_state(config, model, tx, sharding.make_mesh(config.mesh))
  return state


def _old_config(config):
  """`config` as the previous version saved it: old rule names, newer fields absent."""
  old = ml_collections.ConfigDict(config.to_dict())
  old.sharding.rules = _OLD_RULES
  for node, key in ((old, 'loss_precision'), (old, 'debug_finish_delay_s'),
                    (old.model.image, 'variant'), (old.model.image, 'mask'),
                    (old.model.text, 'activation')):
    del node[key]
  return old


def test_the_map_renames_only_the_transformer_mlp():
  old = {'encoder': {'block00': {'mlp': {'Dense_0': {'kernel': 1}, 'Dense_1': {'kernel': 2}},
                                 'attn': {'query': {'kernel': 3}}}},
         'stage1_block00': {'mlp_fc1': {'kernel': 4}, 'mlp': {'Dense_0': {'kernel': 5}}}}
  new = renames.upgrade(old)
  assert new['encoder']['block00']['mlp'] == {'fc1': {'kernel': 1}, 'fc2': {'kernel': 2}}
  assert new['encoder']['block00']['attn'] == old['encoder']['block00']['attn']
  # Not exactly the old pair: not the Transformer MLP (left alone).
  assert new['stage1_block00'] == old['stage1_block00']
  assert renames.downgrade(new) == old
  assert renames.is_old(old) and not renames.is_old(new)
  assert renames.upgrade_pattern(r'^text/.*?(?:mlp/Dense_1/kernel$)') == (
      r'^text/.*?(?:mlp/fc2/kernel$)')


def test_old_checkpoint_restores_state_params_and_config(tmp_path):
  config = _config()
  state = _state(config)
  old_state = renames.downgrade(state)
  mlp = old_state.params['text']['encoder']['block01']['mlp']
  assert set(mlp) == {'Dense_0', 'Dense_1'}
  assert renames.is_old(old_state.opt_state)   # Adam's moments mirror the parameters.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, old_state, _old_config(config))
  ckpt.close()

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  # Resuming: the current state's template restores the old step, names current.
  step, restored = ckpt.restore_latest(_state(config))
  assert step == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Inference / init_from: the parameters as saved, names current.
  params = ckpt.restore_params(1)
  assert set(params['text']['encoder']['block01']['mlp']) == {'fc1', 'fc2'}
  np.testing.assert_array_equal(params['image']['encoder']['block00']['mlp']['fc2']['kernel'],
                                state.params['image']['encoder']['block00']['mlp']['fc2']['kernel'])
  # The config: rules renamed, fields added since at their defaults, the model's shapes equal.
  saved = ckpt.restore_config(1)
  ckpt.close()
  assert [tuple(r[0] for r in saved.sharding.rules)] == [
      ('attn/(query|key|value)/kernel$', 'mlp/fc1/kernel$', 'mlp/fc1/bias$', 'mlp/fc2/kernel$')]
  assert saved.loss_precision == 'highest' and saved.model.image.variant == ''
  assert saved.model.image.mask.kind == 'none' and saved.model.text.activation == 'gelu_tanh'
  specs = sharding.param_partition_specs(params, saved.sharding.rules)
  assert specs['text']['encoder']['block00']['mlp']['fc1']['kernel'] == jax.sharding.PartitionSpec(
      None, 'model')
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  assert shapes(_state(saved).params) == shapes(state.params)
  # Resuming it with the current config: only the (allowed) sharding rules differ.
  diff = config_lib.resume_diff(saved, config)
  assert [field for field, _, _ in diff['allowed']] == ['sharding.rules']
  assert not diff['added'] and not diff['removed']
