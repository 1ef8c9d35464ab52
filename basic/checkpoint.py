"""Orbax checkpoints of the train state in `{workdir}/checkpoints`.

Each checkpoint step holds the train state (step, params, optimiser state) and the experiment
config as JSON, so a checkpoint describes itself. Saves are asynchronous; orbax commits a step
atomically (a half-written step is never reported as the latest).
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  """Save / restore the train state of a run."""

  def __init__(self, directory: str, *, max_to_keep: int, keep_period=None,
               async_save: bool = True):
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'config'))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict) -> bool:
    config_dict = json.loads(json.dumps(config.to_dict(), default=list))
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, template, step=None):
    """Restores the state at `step` (default latest) into the structure/shardings of `template`.

    `template` may hold jax.Arrays or jax.ShapeDtypeStructs with shardings.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def restore_config(self, step=None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored['config'])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
