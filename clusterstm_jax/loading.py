"""A trained model from disk: params restored from a training checkpoint or an export, with the
run config, tokenizer and mesh that go with them; and what the export and evaluate commands do
with one (`export_run`, `evaluate_checkpoint`)."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections

from clusterstm_jax import checkpointing
from clusterstm_jax import evaluators
from clusterstm_jax import exports
from clusterstm_jax import portable
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import checks
from clusterstm_jax.data import pipeline
from clusterstm_jax.data.tokenizer import open_tokenizer
from clusterstm_jax.errors import UserError


def restore_params(config, ckpt_dir: str, step: int, mesh, vocab_size: int):
  """Params only, from a training checkpoint (export, evaluation)."""
  task = tasks_lib.get(config, tasks_lib.TextSpec(vocab_size))
  tx, _ = trainer_lib.make_optimizer(config, 1, 0)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  _, shardings, abstract_state = trainer_lib.state_layout(task, tx, mesh, rules)
  manager = checkpointing.make_manager(ckpt_dir, read_only=True, async_save=False,
                                       with_data=False)
  abstract = checkpointing.abstract_with_shardings(abstract_state, shardings)
  try:
    return checkpointing.restore(manager, step, abstract)['params']
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except -- a damaged or foreign checkpoint
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    raise UserError(f'checkpoint step {step} in {ckpt_dir} does not restore ({reason}); a '
                    'training run moves it aside and resumes from the previous one') from e


def load_model(checkpoint: str, data_dir: str = ''):
  """An export or a training checkpoint -> (run config, params, tokenizer, mesh).

  data_dir, if given, replaces the run's config.data.data_dir (data moved to another machine).
  """
  if not checkpoint:
    raise UserError('config.checkpoint is required: an export dir or a training checkpoint')
  if not os.path.exists(checkpoint):
    raise UserError(f'checkpoint not found: {checkpoint}')
  if portable.find(checkpoint):
    return load_portable(checkpoint, data_dir)
  # A training workdir also holds a config.json (its resolved config): an export has params/.
  is_export = (os.path.exists(os.path.join(checkpoint, 'config.json'))
               and os.path.exists(os.path.join(checkpoint, 'params')))
  if is_export:
    config = exports.read_config(checkpoint)
  else:
    run_ckpts = os.path.join(checkpoint, 'checkpoints')
    ckpt_dir, step = checkpointing.resolve_checkpoint_path(
        run_ckpts if os.path.isdir(run_ckpts) else checkpoint)
    config = ml_collections.ConfigDict(checkpointing.restore_config(ckpt_dir, step))
  if data_dir:
    config.data.data_dir = data_dir
  mesh = sharding_lib.make_mesh(config.mesh)
  if not is_export:
    tokenizer = pipeline.get_tokenizer(config.data)
    return (config, restore_params(config, ckpt_dir, step, mesh, tokenizer.vocab_size),
            tokenizer, mesh)
  tokenizer = open_tokenizer(exports.tokenizer_path(checkpoint))
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  boxed = tasks_lib.base.abstract_params(task.model, task.init_inputs)
  shardings = sharding_lib.tree_shardings(boxed, mesh,
                                          sharding_lib.logical_rules(config.sharding_rules))
  abstract = checkpointing.abstract_with_shardings(nn.unbox(boxed), shardings)
  return config, exports.read_params(checkpoint, abstract), tokenizer, mesh


def load_portable(export_dir: str, data_dir: str = ''):
  """A safetensors / npz export (portable.py) -> (run config, params, tokenizer, mesh)."""
  path = portable.find(export_dir)
  config = ml_collections.ConfigDict(portable.read_config(path))
  if data_dir:
    config.data.data_dir = data_dir
  mesh = sharding_lib.make_mesh(config.mesh)
  tokenizer = open_tokenizer(exports.tokenizer_path(export_dir))
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  boxed = tasks_lib.base.abstract_params(task.model, task.init_inputs)
  shardings = sharding_lib.tree_shardings(boxed, mesh,
                                          sharding_lib.logical_rules(config.sharding_rules))
  params = portable.read_params(path, config, nn.unbox(boxed))
  return config, jax.device_put(params, shardings), tokenizer, mesh


def _latest_params(workdir: str):
  """(run config, params) of the latest checkpoint of a training run."""
  ckpt_dir, step = checkpointing.resolve_checkpoint_path(os.path.join(workdir, 'checkpoints'))
  config = ml_collections.ConfigDict(checkpointing.restore_config(ckpt_dir, step))
  mesh = sharding_lib.make_mesh(config.mesh)
  tokenizer = pipeline.get_tokenizer(config.data)
  return config, restore_params(config, ckpt_dir, step, mesh, tokenizer.vocab_size)


def export_portable(workdir: str, out_dir: str | None, fmt: str) -> str:
  """`export --format=safetensors|npz`: the latest checkpoint of a run as one weight file
  (portable.py; default WORKDIR/export_<fmt>)."""
  config, params = _latest_params(workdir)
  return portable.write(out_dir or os.path.join(workdir, f'export_{fmt}'), params, config,
                        pipeline.tokenizer_path(config.data), fmt)


def export_run(workdir: str, out_dir: str | None = None, *, overwrite: bool = False) -> str:
  """Exports the latest checkpoint of a training run (default: WORKDIR/export). An existing
  `out_dir` must be an export of ours, replaced only with `overwrite` (exports.check_out_dir)."""
  out_dir = out_dir or os.path.join(workdir, 'export')
  exports.check_out_dir(out_dir, overwrite=overwrite)  # before minutes of restoring
  config, params = _latest_params(workdir)
  return exports.write_export(out_dir, params, config, pipeline.tokenizer_path(config.data),
                              overwrite=overwrite)


def apply_data_override(config, data, tokenizer) -> None:
  """An eval config's `data` block (configs/eval_retrieval.py) on top of the model's
  config.data: another dataset, builder config, split or data_dir. The text always goes
  through the model's own tokenizer; another one is an error."""
  d = config.data
  if data.name and data.name != d.name:
    d.name, d.builder_config = data.name, 'default'
    d.eval_split = checks.eval_split(data.name)
  for field in ('builder_config', 'eval_split', 'data_dir'):
    if data.get(field):
      d[field] = data[field]
  if data.tokenizer:
    path = os.path.expanduser(data.tokenizer)
    if not os.path.isfile(path):
      raise UserError(f'tokenizer model not found: {path} (config.data.tokenizer)')
    with open(path, 'rb') as a, open(tokenizer.model_path, 'rb') as b:
      if a.read() != b.read():
        raise UserError(f'tokenizer mismatch: {path} is not the tokenizer the model was trained '
                        f'with ({tokenizer.model_path}); leave config.data.tokenizer empty')
  d.tokenizer = os.path.abspath(tokenizer.model_path)


def evaluate_checkpoint(eval_config) -> dict:
  """evaluate's work: evaluates eval_config.checkpoint (configs/eval_*.py) on its own data or
  on eval_config.data's, prints the table, writes the JSON (eval_config.output, default
  CHECKPOINT/eval_<type>.json) and returns it."""
  ev = eval_config.eval
  config, params, tokenizer, mesh = load_model(eval_config.checkpoint, eval_config.data.data_dir)
  apply_data_override(config, eval_config.data, tokenizer)
  checks.check_data(config.data, [ev.split or config.data.eval_split])
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  ctx = evaluators.Context(config=config, params=params, predict_fns=task.predict_fns,
                           decode=task.decode, tokenizer=tokenizer, mesh=mesh)
  metrics, details = evaluators.evaluate(ev, ctx)
  print(evaluators.format_results({f'{ev.type}/{k}': v for k, v in metrics.items()}))
  out = {'checkpoint': os.path.abspath(eval_config.checkpoint), 'task': config.task,
         'dataset': config.data.name, 'builder_config': config.data.builder_config,
         'split': ev.split or config.data.eval_split, 'eval': ev.to_dict(),
         'metrics': {k: float(v) for k, v in metrics.items()}}
  if 'predictions' in details:
    preds, refs = details['predictions'], details['references']
    out['samples'] = [{'id': i, 'prediction': preds[i], 'references': refs[i]}
                      for i in sorted(preds)[:eval_config.get('num_samples', 0)]]
    for s in out['samples']:
      print(f'  {s["id"]}: {s["prediction"]!r}  (reference: {s["references"][0]!r})')
  # Another dataset than the model's gets its own file, next to the one of its own data.
  other = '' if not eval_config.data.name else f'_{config.data.name}_{config.data.builder_config}'
  path = eval_config.output or os.path.join(eval_config.checkpoint, f'eval_{ev.type}{other}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(out, f, indent=1)
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')
  return out
