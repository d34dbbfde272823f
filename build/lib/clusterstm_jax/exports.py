"""The export format: params + config + tokenizer, no optimizer state, nothing that runs code on
load. (python -m clusterstm_jax.export writes one from a training run.)

Layout of an export directory:
  params/          Orbax (tensorstore/OCDBT) arrays of the model parameters
  config.json      the run's full config (plain JSON)
  tokenizer.model  the SentencePiece model the text tower was trained with
Loading needs only the config to rebuild the module and the arrays; no pickles anywhere.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from flax import traverse_util

from clusterstm_jax.errors import UserError


def _path(path: str) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); gs:// and other URLs as they are."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_export(out_dir: str, params, config: ml_collections.ConfigDict,
                 tokenizer_path: str) -> str:
  """Writes atomically: everything goes to `out_dir.tmp` first, then one rename.

  Every process calls this (the params save is collective); process 0 alone writes the small
  files and renames. Barriers keep the others from writing into a tmp dir being removed, and
  from returning before the export exists.
  """
  out = _path(out_dir)
  tmp = out.parent / (out.name + '.tmp')
  is_main = jax.process_index() == 0
  if is_main and tmp.exists():
    tmp.rmtree()
  _barrier('export:tmp_clean')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / 'params', params)
  if is_main:
    (tmp / 'config.json').write_text(json.dumps(config.to_dict(), indent=1))
    if tokenizer_path:
      epath.Path(tokenizer_path).copy(tmp / 'tokenizer.model')
    if out.exists():
      out.rmtree()
    tmp.rename(out)
  _barrier('export:done')
  return str(out)


def read_config(export_dir: str) -> ml_collections.ConfigDict:
  path = _path(export_dir) / 'config.json'
  if not path.exists():
    raise UserError(f'not an exported model (no config.json): {export_dir}')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def tokenizer_path(export_dir: str) -> str:
  return os.path.join(export_dir, 'tokenizer.model')


def read_params(export_dir: str, abstract_params):
  """Restores params with the shapes/dtypes/shardings of `abstract_params` (ShapeDtypeStructs)."""
  path = _path(export_dir) / 'params'
  if not path.exists():
    raise UserError(f'not an exported model (no params/): {export_dir}')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_params)


def load_params_into(export_dir: str, params, *, report=print):
  """`config.init`: pretrained weights from an export, restored into the current shardings.

  Matched by name: every parameter of `params` that the export has is loaded; the others keep
  their values (a fine-tuned model's new heads), and the export's parameters that `params`
  lacks are skipped (e.g. the MAE decoder when fine-tuning). `report` gets one line naming
  both groups. A shared name with another shape, or no shared name at all, is a UserError.
  """
  path = os.path.join(os.path.abspath(export_dir), 'params')
  if not os.path.exists(path):
    raise UserError(f'config.init is not an exported model (no params/): {export_dir}')
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = traverse_util.flatten_dict(ckptr.metadata(path).item_metadata.tree, sep='/')
    target = traverse_util.flatten_dict(params, sep='/')
    shared = sorted(set(stored) & set(target))
    for name in shared:
      if tuple(stored[name].shape) != tuple(target[name].shape):
        raise UserError(f'config.init {export_dir}: parameter {name} has shape '
                        f'{tuple(stored[name].shape)} there but {tuple(target[name].shape)} in '
                        'this model (the model config must match the pretrained one)')
    if not shared:
      raise UserError(f'config.init {export_dir} shares no parameter with this model')
    abstract = traverse_util.unflatten_dict(
        {n: jax.ShapeDtypeStruct(target[n].shape, target[n].dtype, sharding=target[n].sharding)
         for n in shared}, sep='/')
    loaded = traverse_util.flatten_dict(ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)), sep='/')
  report(f'init from {export_dir}: loaded {len(shared)} of {len(target)} arrays; '
         f'kept at init: {_summary(set(target) - set(shared))}; '
         f'not used: {_summary(set(stored) - set(shared))}')
  return traverse_util.unflatten_dict({**target, **loaded}, sep='/')


def _summary(names) -> str:
  """'none', or names grouped by their top-level module: 'text_decoder (26 arrays), temp'."""
  groups = {}
  for name in sorted(names):
    groups.setdefault(name.split('/')[0], []).append(name)
  if not groups:
    return 'none'
  return ', '.join(k if v == [k] else f'{k} ({len(v)} arrays)' for k, v in groups.items())
