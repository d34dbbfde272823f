r"""Exported models: params + config + tokenizer, no optimizer state, nothing that runs code on load.

  python -m clusterstm_jax.export --workdir=RUN [--out=DIR]

Layout of an export directory:
  params/          Orbax (tensorstore/OCDBT) arrays of the model parameters
  config.json      the run's full config (plain JSON)
  tokenizer.model  the SentencePiece model the text tower was trained with
Loading needs only the config to rebuild the module and the arrays; no pickles anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp

from clusterstm_jax.errors import UserError


def write_export(out_dir: str, params, config: ml_collections.ConfigDict,
                 tokenizer_path: str) -> str:
  """Writes atomically: everything goes to `out_dir.tmp` first, then one rename."""
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + '.tmp'
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, 'params'), params)
  if jax.process_index() == 0:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=1)
    if tokenizer_path:
      shutil.copyfile(tokenizer_path, os.path.join(tmp, 'tokenizer.model'))
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  return out_dir


def read_config(export_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(export_dir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'not an exported model (no config.json): {export_dir}')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def tokenizer_path(export_dir: str) -> str:
  return os.path.join(export_dir, 'tokenizer.model')


def read_params(export_dir: str, abstract_params):
  """Restores params with the shapes/dtypes/shardings of `abstract_params` (ShapeDtypeStructs)."""
  path = os.path.join(os.path.abspath(export_dir), 'params')
  if not os.path.exists(path):
    raise UserError(f'not an exported model (no params/): {export_dir}')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_params)


def load_params_into(export_dir: str, params):
  """`config.init`: pretrained weights from an export, restored into the current shardings."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  return read_params(export_dir, abstract)


def export_run(workdir: str, out_dir: str | None = None) -> str:
  """Exports the latest checkpoint of a training run."""
  from clusterstm_jax import checkpointing
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  from clusterstm_jax.data import pipeline

  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt_dir, step = checkpointing.resolve_checkpoint_path(ckpt_dir)
  config = ml_collections.ConfigDict(checkpointing.restore_config(ckpt_dir, step))
  mesh = sharding_lib.make_mesh(config.mesh)
  tokenizer = pipeline.get_tokenizer(config.data)
  params = step_lib.restore_params(config, ckpt_dir, step, mesh, tokenizer.vocab_size)
  return write_export(out_dir or os.path.join(workdir, 'export'), params, config,
                      pipeline.tokenizer_path(config.data))


def main(argv):
  del argv
  from absl import flags
  try:
    out = export_run(flags.FLAGS.workdir, flags.FLAGS.out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'exported to {out}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
  flags.DEFINE_string('out', None, 'Export directory (default: WORKDIR/export).')
  app.run(main)
