"""The export format: params + config + tokenizer, no optimizer state, nothing that runs code on
load. (python -m clusterstm_jax.export writes one from a training run.)

Layout of an export directory:
  params/          Orbax (tensorstore/OCDBT) arrays of the model parameters
  config.json      the run's full config (plain JSON)
  tokenizer.model  the tokenizer the text tower was trained with (a SentencePiece model, or a
                   BERT WordPiece vocab.txt with its tokenizer_config.json beside it: the
                   lower-casing it was read with)
  manifest.json    the format name and the size and SHA-256 of every other file, checked on
                   every load: an edited, truncated or missing file is a one-line error
Loading needs only the config to rebuild the module and the arrays; no pickles anywhere.

An export is written into `<out>.export-tmp` and renamed into place whole. An existing `<out>`
is never deleted unless it is an export itself (it has our manifest) and `overwrite` is given:
a directory of the user's, or a run's workdir, is refused.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from flax import traverse_util

from clusterstm_jax.data import tokenizer as tokenizer_lib
from clusterstm_jax.errors import UserError


def _path(path: str) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); gs:// and other URLs as they are."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


FORMAT = 'clusterstm_jax export'
MANIFEST = 'manifest.json'


def _files(root: epath.Path) -> list[str]:
  """Every file under `root` but the manifest, as sorted relative paths."""
  out, todo = [], [root]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      elif child.name != MANIFEST or child.parent != root:
        out.append(str(child)[len(str(root)) + 1:])
  return sorted(out)


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def is_export(path: str) -> bool:
  """Whether `path` is an export of ours (its manifest names our format)."""
  try:
    return json.loads((_path(path) / MANIFEST).read_text()).get('format') == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def check_out_dir(out_dir: str, *, overwrite: bool = False) -> None:
  """Refuses an `out_dir` that holds anything but an export of ours, and an export of ours
  unless `overwrite` (checked before anything is computed)."""
  out = _path(out_dir)
  if not out.exists():
    return
  if not out.is_dir():
    raise UserError(f'export --out={out_dir} is a file; give a new directory')
  if not any(True for _ in out.iterdir()):
    return
  if not is_export(out_dir):
    raise UserError(f'export --out={out_dir} exists and is not an export (it has other files); '
                    'give a new or empty directory (nothing was changed)')
  if not overwrite:
    raise UserError(f'export --out={out_dir} already holds an export; pass --overwrite to '
                    'replace it')


def write_export(out_dir: str, params, config: ml_collections.ConfigDict,
                 tokenizer_path: str, *, overwrite: bool = False) -> str:
  """Writes atomically: everything goes to `<out>.export-tmp` first, then one rename (an old
  export, with `overwrite`, is renamed aside first and removed last).

  Every process calls this (the params save is collective); process 0 alone writes the small
  files and renames. Barriers keep the others from writing into a tmp dir being removed, and
  from returning before the export exists.
  """
  check_out_dir(out_dir, overwrite=overwrite)
  out = _path(out_dir)
  tmp = out.parent / (out.name + '.export-tmp')
  old = out.parent / (out.name + '.export-old')
  is_main = jax.process_index() == 0
  if is_main:
    for leftover in (tmp, old):  # ours by their names: a write or replace that was killed
      if leftover.exists():
        leftover.rmtree()
  _barrier('export:tmp_clean')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / 'params', params)
  if is_main:
    (tmp / 'config.json').write_text(json.dumps(config.to_dict(), indent=1))
    if tokenizer_path:
      epath.Path(tokenizer_path).copy(tmp / 'tokenizer.model')
      for name, text in tokenizer_lib.export_files(tokenizer_path).items():
        (tmp / name).write_text(text)
    files = {name: {'bytes': (tmp / name).stat().length, 'sha256': _sha256(tmp / name)}
             for name in _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps({'format': FORMAT, 'version': 1, 'files': files},
                                           indent=1))
    if out.exists():
      out.rename(old)
    tmp.rename(out)
    if old.exists():
      old.rmtree()
  _barrier('export:done')
  return str(out)


def verify(export_dir: str) -> None:
  """Checks every file against the manifest: one UserError naming the first that differs."""
  root = _path(export_dir)
  try:
    manifest = json.loads((root / MANIFEST).read_text())
    files = manifest['files']
    assert manifest.get('format') == FORMAT and isinstance(files, dict)
  except FileNotFoundError:
    raise UserError(f'{export_dir}: not a checked export (no {MANIFEST}); export the run '
                    'again') from None
  except (OSError, ValueError, KeyError, TypeError, AssertionError):
    raise UserError(f'{export_dir}: {MANIFEST} is damaged; export the run again') from None
  for name, want in sorted(files.items()):
    path = root / name
    if not path.exists():
      raise UserError(f'{export_dir}: {name} is missing (listed in {MANIFEST})')
    if path.stat().length != want.get('bytes') or _sha256(path) != want.get('sha256'):
      raise UserError(f'{export_dir}: {name} was changed or truncated since the export '
                      f'(its checksum differs from {MANIFEST}); export the run again')
  extra = sorted(set(_files(root)) - set(files))
  if 'config.json' in extra or any(n.startswith('params/') for n in extra):
    raise UserError(f'{export_dir}: {extra[0]} is not listed in {MANIFEST}; export the run '
                    'again')


def read_config(export_dir: str) -> ml_collections.ConfigDict:
  """The export's config, after checking the whole export against its manifest."""
  path = _path(export_dir) / 'config.json'
  if not path.exists():
    raise UserError(f'not an exported model (no config.json): {export_dir}')
  verify(export_dir)
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise UserError(f'{export_dir}/config.json is not valid JSON: {e}') from e


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
  verify(export_dir)
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
