"""Orbax checkpoints: train state + data-iterator state + config, atomic and asynchronous.

A checkpoint step directory holds three items, four with an image stream:
  state       the train state pytree (params, optimizer state, step), saved sharded;
  data        the grain iterator state (per process), so a resumed run reads the same data;
  image_data  the image stream's grain iterator state (config.images), beside the video one;
  config      the run's config as JSON (no pickles anywhere).
Orbax writes every step into a temporary directory and renames it when complete, so an interrupted
save never reads as a checkpoint; `latest_step` only sees finished ones.

`restore_latest` resumes from the newest checkpoint that restores: one that does not (a truncated
or missing array file, garbage metadata, a removed item, an empty step directory) is moved aside
to `<checkpoints>/../checkpoints_unreadable/<step>` (never deleted) with a one-line warning. A
checkpoint of another model shape is not corrupt: it is a UserError naming the parameter.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

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
                 read_only: bool = False, keep_period: int = 0) -> ocp.CheckpointManager:
  data_items = (('data',) if with_data else ()) + (('image_data',) if with_image_data else ())
  items = ('state', 'config') + data_items
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  for item in data_items:
    handlers[item] = grain.PyGrainCheckpointHandler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      keep_period=keep_period or None,
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


def _names(tree) -> dict:
  """'params/vision/kernel' -> leaf: paths as plain names, so the stored metadata (dicts and
  lists) and the abstract state (dicts, tuples, optax namedtuples) name leaves alike."""
  def name(k):
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {'/'.join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state) -> str | None:
  """'params/x/kernel: (4, 8) there, (4, 16) here' for the first parameter whose stored shape
  differs from the model's (or that is not stored); None when all match. Raises when the
  metadata cannot be read (a corrupt checkpoint)."""
  stored = manager.item_metadata(step)['state']
  if stored is None:
    raise ValueError('no state metadata')
  there = _names(getattr(stored, 'tree', stored))
  if not any(n.startswith('params/') for n in there):
    raise ValueError('no params in the state metadata')
  for name, leaf in _names(abstract_state).items():
    if not name.startswith('params/'):
      continue
    if name not in there:
      return f'{name}: not stored there'
    if tuple(there[name].shape) != tuple(leaf.shape):
      return f'{name}: {tuple(there[name].shape)} there, {tuple(leaf.shape)} here'
  return None


def move_aside(directory: str, step: int, reason: str, report: Callable = print) -> str:
  """Moves step dir `step` of `directory` to `<directory>_unreadable/<step>[.N]` (kept for
  inspection, never deleted); returns the new path."""
  src = epath.Path(directory) / str(step)
  dst_root = epath.Path(str(directory).rstrip('/') + '_unreadable')
  dst_root.mkdir(parents=True, exist_ok=True)
  dst = dst_root / str(step)
  if dst.exists():
    dst = dst_root / f'{step}.{int(time.time())}'
  if '://' in str(src):
    src.copy(dst)  # object stores: copy, then remove the step from the checkpoint dir
    src.rmtree()
  else:
    shutil.move(str(src), str(dst))
  report(f'warning: checkpoint step {step} in {directory} does not restore ({reason}); '
         f'moved to {dst}, trying the previous one')
  return str(dst)


def _try_restore(manager, step, abstract_state, data_iter, image_iter):
  """(state, None), or (None, reason) when step `step` is unreadable; a step that holds another
  model or lacks the image stream's position is a user error (raised), not a corruption."""
  try:
    mismatch = _shape_mismatch(manager, step, abstract_state)
  except Exception as e:  # pylint: disable=broad-except -- unreadable metadata: corrupt
    error = e
  else:
    if mismatch:
      raise CheckpointError(
          f'checkpoint step {step} in {manager.directory} holds another model ({mismatch}): the '
          'config changed since it was written; use another workdir, or the original config')
    try:
      return restore(manager, step, abstract_state, data_iter, image_iter=image_iter), None
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except -- any failure to read it: corrupt
      error = e
  return None, ' '.join(f'{type(error).__name__}: {error}'.split())[:200]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter=None, *,
                   image_iter=None, reopen: Callable[[], ocp.CheckpointManager],
                   report: Callable = print):
  """(manager, state) from the newest checkpoint of `manager` that restores, else (manager,
  None). A step that fails is moved aside (move_aside) and `reopen()` gives a manager that no
  longer lists it. Every process tries the same step; process 0 moves (a shared workdir)."""
  directory = str(manager.directory)
  while True:
    step = manager.latest_step()
    if step is None:
      return manager, None
    state, reason = _try_restore(manager, step, abstract_state, data_iter, image_iter)
    if reason is None:
      return manager, state
    if jax.process_index() == 0:
      manager.close()
      move_aside(directory, step, reason, report)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # lazy: multi-process runs only
      multihost_utils.sync_global_devices(f'checkpoint:moved_aside:{step}')
    manager = reopen()


def restore_given(path: str, abstract_state: Any, data_iter=None, *, image_iter=None,
                  report: Callable = print) -> tuple[Any, str, int]:
  """(state, dir, step) from `config.resume`: a step directory restores or is a one-line error;
  a run's checkpoint directory gives its newest step that restores (the ones that do not are
  named in a warning and left where they are: the directory is not this run's)."""
  directory, latest = resolve_checkpoint_path(path)
  manager = make_manager(directory, read_only=True, async_save=False,
                         with_image_data=image_iter is not None)
  given_step = epath.Path(path.rstrip('/')).name.isdigit()
  steps = [latest] if given_step else sorted(manager.all_steps(), reverse=True)
  for step in steps:
    state, reason = _try_restore(manager, step, abstract_state, data_iter, image_iter)
    if reason is None:
      return state, directory, step
    if given_step:
      raise CheckpointError(f'resume={path}: checkpoint step {step} does not restore ({reason})')
    report(f'warning: resume={path}: checkpoint step {step} does not restore ({reason}); '
           'trying the previous one')
  raise CheckpointError(f'resume={path}: no checkpoint there restores')


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
