r"""Pretraining entry point.

  python -m clusterstm_jax.train --config=configs/pretrain.py [--workdir=DIR] [--config.x=y]

Sections: setup -> mesh -> data -> teacher -> model and optimizer (born sharded) -> restore ->
loop (log, checkpoint) -> final zero-shot retrieval. Running the same command again in the same
workdir resumes from the latest checkpoint, or reports that the run is complete.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as the entry point, so that importing this module (the teacher is
  trained through train_and_evaluate, tests call it directly) never defines flags twice."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go. Default: '
                      'workdirs/<config name>[_<arg>].')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
  flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with '
                    'auto-detection (TPU pods).')


def default_workdir(config_path: str) -> str:
  name, _, arg = config_path.partition(':')
  stem = os.path.splitext(os.path.basename(name))[0]
  suffix = '_' + arg.replace(',', '_').replace('=', '-').replace('/', '-') if arg else ''
  return os.path.join('workdirs', stem + suffix)


def init_distributed() -> None:
  import jax
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  from clusterstm_jax.errors import UserError
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/pretrain.py')
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']))
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, tfds) off by default
  try:
    init_distributed()
    train_and_evaluate(config, workdir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def step_kind(config, step: int, total_steps: int) -> str:
  """What step `step` (0-based) trains on: 'video', 'image' or 'unmasked' (video, every token).

  Decided by the step number alone, so a resumed run switches at the same steps. With
  images.every = k, steps k-1, 2k-1, ... are image steps (UMT alternates whole batches), except
  during unmasked tuning: those last steps exist to adapt the video features to all-token
  evaluation, a masked image step would pull back toward the masked regime, and an unmasked
  image step would compile a third step for a few steps; so they are all unmasked video steps
  and the image stream pauses (its position is kept).
  """
  from clusterstm_jax import config_lib
  if step >= total_steps - config.get('unmasked_steps', 0):  # FLIP-style unmasked tuning
    return 'unmasked'
  every = config_lib.image_every(config)
  if every and step % every == every - 1:
    return 'image'
  return 'video'


def examples_per_step(config) -> float:
  """Mean examples per step over both streams (epochs count a pass over videos + images)."""
  from clusterstm_jax import config_lib
  every = config_lib.image_every(config)
  if not every:
    return config.batch_size
  return ((every - 1) * config.batch_size + config_lib.image_batch_size(config)) / every


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the final evaluation results."""
  import jax
  import numpy as np
  import tqdm

  from clusterstm_jax import checkpointing
  from clusterstm_jax import config_lib
  from clusterstm_jax import downstream
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  from clusterstm_jax.data import pipeline
  from clusterstm_jax.metric_writer import MetricWriter
  from etils import epath  # workdirs may be gs:// (multi-host runs share one)

  # --- setup ---
  is_main = jax.process_index() == 0
  if is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info('workdir %s, %d processes, %d devices', workdir, jax.process_count(),
               jax.device_count())

  # Paths the user gave are checked before minutes of data building or teacher training.
  if config.resume:
    checkpointing.resolve_checkpoint_path(config.resume)

  # --- mesh ---
  mesh = sharding_lib.make_mesh(config.mesh)
  config_lib.validate(config, sharding_lib.batch_size_per_shard(mesh), jax.process_count())

  # --- data ---
  train_size = len(pipeline.get_source(config.data, config.data.train_split))
  tokenizer = pipeline.get_tokenizer(config.data)
  image_every = config_lib.image_every(config)
  image_config = pipeline.image_data_config(config) if image_every else None
  if image_every:  # an epoch is one pass over the videos and the images (UMT's 5M pairs)
    train_size += len(pipeline.get_source(image_config, image_config.train_split))
  per_step = examples_per_step(config)
  total_steps = config_lib.steps('total', config, data_size=train_size, batch_size=per_step)
  if not 0 <= config.get('unmasked_steps', 0) < total_steps:
    raise config_lib.ConfigError(f'unmasked_steps={config.unmasked_steps} must be in '
                                 f'[0, total_steps={total_steps})')
  warmup_steps = config_lib.steps('warmup', config, data_size=train_size, batch_size=per_step,
                                  default=0)
  train_loader = pipeline.make_train_loader(
      config.data, tokenizer, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode=downstream.example_decoder(config))  # QA batches add questions and answers
  train_iter = iter(train_loader)
  image_iter = None
  if image_every:
    # Another shuffle seed than the videos': on shapes, the stand-in reads the same clips, and
    # the same seed would show each clip's frame right after (or before) the clip itself.
    image_iter = iter(pipeline.make_train_loader(
        image_config, tokenizer, global_batch_size=config_lib.image_batch_size(config),
        seed=(config.seed + 1) % 2**32, process_index=jax.process_index(),
        process_count=jax.process_count()))

  # --- teacher (frozen; its params never enter the train state) ---
  teacher = None
  if step_lib.needs_teacher(config):
    from clusterstm_jax import teacher as teacher_lib
    teacher = teacher_lib.load_teacher(config, mesh)

  # --- model and optimizer, born sharded ---
  trainer = step_lib.build_trainer(config, text=step_lib.TextSpec.from_tokenizer(tokenizer),
                                   mesh=mesh,
                                   total_steps=total_steps, warmup_steps=warmup_steps,
                                   teacher=teacher)

  # --- restore: own workdir -> config.resume -> config.init -> scratch ---
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  manager = checkpointing.make_manager(
      ckpt_dir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing,
      with_image_data=image_iter is not None)
  abstract = checkpointing.abstract_with_shardings(trainer.abstract_state,
                                                   trainer.state_shardings)
  state = None
  if manager.latest_step() is not None:
    step0 = manager.latest_step()
    logging.info('resuming from %s step %d', ckpt_dir, step0)
    state = checkpointing.restore(manager, step0, abstract, train_iter, image_iter=image_iter)
  elif config.resume:
    rdir, rstep = checkpointing.resolve_checkpoint_path(config.resume)
    logging.info('resuming from %s step %d', rdir, rstep)
    state = checkpointing.restore(checkpointing.make_manager(
        rdir, read_only=True, async_save=False, with_image_data=image_iter is not None),
                                  rstep, abstract, train_iter, image_iter=image_iter)
  else:
    state = trainer.init_state(jax.random.key(config.seed))
    if config.init:  # a whole exported model (ours): fine-tuning, continued pretraining
      from clusterstm_jax import export as export_lib
      state['params'] = export_lib.load_params_into(config.init, state['params'])
    elif config.model.get('init'):  # an external image tower (CLIP/SigLIP/ViT) for the student
      state['params'] = _load_vision_tower(config, trainer, state['params'])
  step = int(state['step'])

  results_path = epath.Path(workdir) / 'results.json'
  if step >= total_steps:
    print(f'run already complete: {workdir} is at step {step} of {total_steps}.')
    if results_path.exists():
      results = json.loads(results_path.read_text())
      _print_results(results, is_main)
      manager.close()
      return results

  # --- loop ---
  writer = MetricWriter(workdir)
  base_key = jax.random.key(config.seed + 1)
  bar = tqdm.tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True,
                  desc='train', file=sys.stdout)
  t_last, step_last, examples = time.perf_counter(), step, 0
  last_metrics = None
  # The latest metrics of each kind since the last log, as (step, metrics on device). Image
  # steps are logged under 'image/' in rows of their own step, so the two losses never mix.
  pending = {}
  stop_at = total_steps if config.halt_at_step < 0 else min(config.halt_at_step, total_steps)
  sharding_lib.sync_processes('train:loop')  # all processes start stepping together
  while step < stop_at:
    kind = step_kind(config, step, total_steps)
    if kind == 'image':
      batch = sharding_lib.global_batch(next(image_iter), mesh)
      state, metrics = trainer.train_step_image(state, batch, base_key)
    else:
      batch = sharding_lib.global_batch(next(train_iter), mesh)
      step_fn = trainer.train_step_unmasked if kind == 'unmasked' else trainer.train_step
      state, metrics = step_fn(state, batch, base_key)
    examples += config_lib.image_batch_size(config) if kind == 'image' else config.batch_size
    step += 1
    bar.update(1)
    pending['image' if kind == 'image' else 'video'] = (step, metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      rows = sorted((s, 'image/' if k == 'image' else '', jax.device_get(m))
                    for k, (s, m) in pending.items())
      pending = {}
      bad = sorted(p + k for _, p, m in rows for k, v in m.items()
                   if not math.isfinite(float(v)))
      if bad:
        manager.wait_until_finished()
        raise FloatingPointError(
            f'non-finite {bad} between steps {step_last} and {step}; the last good '
            f'checkpoint is step {manager.latest_step()} in {ckpt_dir}')
      now = time.perf_counter()
      rows[-1][2]['examples_per_sec'] = examples / (now - t_last)  # both streams, unprefixed
      t_last, step_last, examples = now, step, 0
      for s, prefix, m in rows:
        writer.write(s, {(prefix + k if k != 'examples_per_sec' else k): v
                         for k, v in m.items()})
        if not prefix:
          bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
          last_metrics = m
    if step % config.checkpoint_every_steps == 0 or step == stop_at:
      checkpointing.save(manager, step, state, config, train_iter, image_iter=image_iter)
  bar.close()
  manager.wait_until_finished()
  manager.close()
  if step < total_steps:
    print(f'halted at step {step} of {total_steps} (halt_at_step); run again to resume.')
    writer.close()
    return {'step': step, 'halted': True}

  # --- final evaluation ---
  results = run_evals(config, trainer, state['params'], tokenizer, mesh)
  results['step'] = step
  if last_metrics is not None:
    results['final_train_loss'] = float(last_metrics['loss'])
  writer.write(step, {f'eval/{k}': v for k, v in results.items()
                      if isinstance(v, (int, float))})
  writer.close()
  if is_main:  # the only writer; other processes hold the same (replicated) results
    tmp = results_path.with_name(results_path.name + '.tmp')
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(results_path)
  _print_results(results, is_main)
  return results


def _load_vision_tower(config, trainer, params):
  import jax
  from clusterstm_jax.errors import UserError
  from clusterstm_jax.models import clusterstm as clusterstm_lib
  path = os.path.expanduser(config.model.init)
  if not os.path.exists(path):
    raise UserError(f'checkpoint path does not exist: {path} (config.model.init)')
  try:
    loaded = clusterstm_lib.load_pretrained(path, jax.device_get(params), trainer.task.model)
  except ValueError as e:
    raise UserError(f'{path}: {e}') from e
  return jax.device_put(loaded, trainer.state_shardings['params'])


def run_evals(config, trainer, params, tokenizer, mesh) -> dict:
  import jax
  if config.get('evals'):  # fine-tuning runs: evaluators by type (evaluate.py)
    from clusterstm_jax import evaluate
    return evaluate.run_evals(config, params, tokenizer, mesh)
  from clusterstm_jax.data import pipeline
  from clusterstm_jax.evaluators import retrieval

  loader = pipeline.make_eval_loader(
      config.data, tokenizer, split=config.data.eval_split,
      global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  metrics = retrieval.evaluate(iter(loader), mesh, trainer.encode_video, trainer.encode_text,
                               params)
  return {f'zeroshot_{k}': float(v) for k, v in metrics.items()}


def _print_results(results: dict, is_main: bool) -> None:
  from clusterstm_jax.evaluators import metrics as metrics_lib
  if not is_main:
    return
  table = {k[len('zeroshot_'):]: v for k, v in results.items() if k.startswith('zeroshot_')}
  if not table:  # fine-tuning runs
    from clusterstm_jax import evaluate
    print('\n' + evaluate.format_results(results))
    return
  print('\nZero-shot text-video retrieval on the test split:')
  print(metrics_lib.format_table(table))


def parse_flags_or_exit(argv):
  """absl flags parser: a bad override (an unknown config field, a malformed value, an unknown
  `:arg` knob) becomes one line on stderr, not a traceback from ml_collections."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except -- all of these are bad user input
    lines = [l for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
    print(f'error: bad command line: {lines[-1] if len(lines) > 1 else lines[0]}',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags_or_exit)
