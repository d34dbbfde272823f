"""Orbax checkpoints: train state + data-iterator state + config, atomic and asynchronous.

A checkpoint step directory holds three items, four with an image stream:
  state       the train state pytree (params, optimizer state, step), saved sharded;
  data        the grain iterator state (per process), so a resumed run reads the same data;
  image_data  the image stream's grain iterator state (config.images), beside the video one;
  config      the run's config as JSON (no pickles anywhere).
Orbax writes every step into a temporary directory and renames it when complete, so an interrupted
save never reads as a checkpoint; `latest_step` only sees finished ones.
"""
from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from clusterstm_jax.errors import UserError


class CheckpointError(UserError):
  pass


def make_manager(directory: str, *, max_to_keep: int = 2, save_interval_steps: int = 1,
                 async_save: bool = True, with_data: bool = True, with_image_data: bool = False,
                 read_only: bool = False) -> ocp.CheckpointManager:
  data_items = (('data',) if with_data else ()) + (('image_data',) if with_image_data else ())
  items = ('state', 'config') + data_items
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  for item in data_items:
    handlers[item] = grain.PyGrainCheckpointHandler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory) if '://' not in directory else directory,
                               item_names=items, item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict,
         data_iter=None, *, image_iter=None, force: bool = False) -> bool:
  args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(config.to_dict())}
  if data_iter is not None:
    args['data'] = grain.PyGrainCheckpointSave(data_iter)
  if image_iter is not None:  # needs make_manager(with_image_data=True)
    args['image_data'] = grain.PyGrainCheckpointSave(image_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter=None, *,
            image_iter=None):
  """Restores `state` (born with the shardings of `abstract_state`) and the data iterators."""
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    args['data'] = grain.PyGrainCheckpointRestore(data_iter)
  if image_iter is not None:
    if not (epath.Path(manager.directory) / str(step) / 'image_data').exists():
      raise CheckpointError(f'checkpoint step {step} in {manager.directory} has no image-stream '
                            'position (saved with images.every = 0); resume it with '
                            '--config.images.every=0')
    args['image_data'] = grain.PyGrainCheckpointRestore(image_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored['state']


def restore_config(directory: str, step: int | None = None) -> dict:
  """Reads the config JSON stored with a checkpoint (used by evaluation and export)."""
  manager = make_manager(directory, read_only=True, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint found in {directory}')
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def resolve_checkpoint_path(path: str) -> tuple[str, int]:
  """Accepts a run's checkpoint directory or one step directory inside it -> (dir, step)."""
  if '://' not in path and not os.path.exists(path):
    raise CheckpointError(f'checkpoint path does not exist: {path}')
  p = epath.Path(path if '://' in path else os.path.normpath(path))  # os.path mangles gs://
  if p.name.isdigit():
    return str(p.parent), int(p.name)
  manager = make_manager(path, read_only=True, async_save=False)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f'no finished checkpoint in {path}')
  return path, step


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings: restore places each shard where it belongs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
