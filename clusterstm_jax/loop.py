"""One training run: data -> (frozen teacher) -> born-sharded state -> restore -> loop (log,
checkpoint) -> final evaluation. Running it again in the same workdir resumes from the latest
checkpoint, or reports that the run is complete.

`run` is what `python -m clusterstm_jax.train` does: checks the config, trains the default
teacher first when the config needs one that does not exist yet (a run of its own, exported and
reused), then `train_and_evaluate`.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
from absl import logging
from etils import epath  # workdirs may be gs:// (multi-host runs share one)

from clusterstm_jax import checkpointing
from clusterstm_jax import compile_cache
from clusterstm_jax import config_lib
from clusterstm_jax import evaluators
from clusterstm_jax import exports
from clusterstm_jax import loading
from clusterstm_jax import resilience
from clusterstm_jax import progress as progress_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import checks
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import prefetch
from clusterstm_jax.data import teacher_cache
from clusterstm_jax.errors import Preempted, UserError
from clusterstm_jax.evaluators import metrics as metrics_lib
from clusterstm_jax.metric_writer import MetricWriter
from clusterstm_jax.models import clusterstm as clusterstm_lib


# Row keys never prefixed with 'image/': wall-clock figures of the whole interval.
_UNPREFIXED = ('examples_per_sec',)


def run(config, workdir: str) -> dict:
  """Checks, trains a missing default teacher (its own run), then train_and_evaluate.
  SIGTERM/SIGINT stop it at a step boundary after saving (errors.Preempted)."""
  check(config, workdir)
  compile_cache.use(config, workdir)  # before the teacher's run: its programs go there too
  with resilience.handle_preemption():
    prepare_teacher(config)
    return train_and_evaluate(config, workdir)


def check(config, workdir: str | None = None) -> None:
  """What can be checked in seconds, before minutes of data building or teacher training, and
  before anything is created: every problem is one UserError naming the field or path."""
  if workdir is not None:
    resilience.check_workdir(workdir)
  config_lib.validate_fields(config)
  if config.resume:
    checkpointing.resolve_checkpoint_path(config.resume)
  try:
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.logical_rules(config.sharding_rules)
  except ValueError as e:
    raise UserError(f'config.mesh={config.mesh!r}, config.sharding_rules='
                    f'{config.sharding_rules!r}: {e}') from e
  config_lib.validate(config, sharding_lib.batch_size_per_shard(mesh), jax.process_count())
  tasks_lib.name(config)
  pipeline.check_data_dir(config.data)
  if tasks_lib.uses_teacher_cache(config):  # made for this config, complete
    teacher_cache.check_config(config)
    teacher_cache.open_manifest(config.teacher.cache, teacher_lib.cache_fingerprint(config))
  if config.init and not config.data.tokenizer and config.data.name != 'shapes':
    # Fine-tuning an export on real data: its tokenizer is the one its weights were trained with.
    config.data.tokenizer = exports.tokenizer_path(config.init)
  evals = config.get('evals') or {}
  checks.check_data(config.data, [config.data.train_split, config.data.eval_split,
                                  *(ev.get('split', '') for ev in evals.values())])
  if config_lib.image_every(config):
    image_config = pipeline.image_data_config(config)
    checks.check_data(image_config, [image_config.train_split], tokenizer=False)
  model = config.get('model') or {}
  for field in ('init', 'text_init'):  # external towers of the student
    path = model.get(field) and os.path.expanduser(model[field])
    if path and not os.path.exists(path):
      raise UserError(f'checkpoint path does not exist: {path} (config.model.{field})')
  if tasks_lib.needs_teacher(config) and (config.teacher.get('init') or
                                          config.teacher.get('tokenizer', {}).get('model')):
    teacher_lib.tokenizer_path(config)  # external teacher weights need their own tokenizer


def prepare_teacher(config, *, always: bool = False) -> None:
  """Trains and exports the teacher of config.teacher.workdir when the config needs one (or
  `always`: tools that look at teacher features) that does not exist yet, with
  config.teacher.config on the student's data; then it is reused."""
  needed = always or tasks_lib.needs_teacher(config)
  if not needed or config.teacher.get('init') or config.teacher.export:
    return  # external weights or a given export: loaded (and checked) by teacher.load_teacher
  if teacher_lib.has_export(config):
    return
  tc = config.teacher
  teacher_config = config_lib.load_config_file(tc.config)
  with teacher_config.unlocked():
    teacher_config.data = config.data.copy_and_resolve_references()
  logging.info('no teacher at %s: training one with %s', tc.workdir, tc.config)
  print(f'Training the teacher first ({tc.config} -> {tc.workdir}); it is reused afterwards.')
  train_and_evaluate(teacher_config, tc.workdir)
  loading.export_run(tc.workdir, teacher_lib.export_dir(config))


def step_kind(config, step: int, total_steps: int) -> str:
  """What step `step` (0-based) trains on: 'video', 'image' or 'unmasked' (video, every token).

  Decided by the step number alone, so a resumed run switches at the same steps. With
  images.every = k, steps k-1, 2k-1, ... are image steps (UMT alternates whole batches), except
  during unmasked tuning: those last steps exist to adapt the video features to all-token
  evaluation, a masked image step would pull back toward the masked regime, and an unmasked
  image step would compile a third step for a few steps; so they are all unmasked video steps
  and the image stream pauses (its position is kept).
  """
  if step >= total_steps - config.get('unmasked_steps', 0):  # FLIP-style unmasked tuning
    return 'unmasked'
  every = config_lib.image_every(config)
  if every and step % every == every - 1:
    return 'image'
  return 'video'


def examples_per_step(config) -> float:
  """Mean examples per step over both streams (epochs count a pass over videos + images)."""
  every = config_lib.image_every(config)
  if not every:
    return config.batch_size
  return ((every - 1) * config.batch_size + config_lib.image_batch_size(config)) / every


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the final evaluation results. The config
  is checked first (nothing created for a bad one); the workdir is locked while it runs."""
  check(config, workdir)
  with resilience.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  # --- setup ---
  t_start = time.perf_counter()
  is_main = jax.process_index() == 0
  progress_lib.save_config(config, workdir, enabled=is_main)
  logging.info('workdir %s, %d processes, %d devices', workdir, jax.process_count(),
               jax.device_count())

  # Paths the user gave are checked before minutes of data building or teacher training.
  if config.resume:
    checkpointing.resolve_checkpoint_path(config.resume)

  # --- mesh ---
  mesh = sharding_lib.make_mesh(config.mesh)
  config_lib.validate(config, sharding_lib.batch_size_per_shard(mesh), jax.process_count())

  # --- data ---
  # Every (video, caption) pair of multi-caption datasets, every question for VideoQA.
  train_source = pipeline.train_source(config.data, tasks_lib.examples(config), announce=is_main)
  train_size = len(train_source)
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
  # --- teacher (frozen; its params never enter the train state) ---
  teacher = None
  if tasks_lib.needs_teacher(config):
    teacher = teacher_lib.load_teacher(config, mesh)

  # --- model and optimizer, born sharded ---
  trainer = trainer_lib.build_trainer(
      config, text=tasks_lib.TextSpec.from_tokenizer(tokenizer), mesh=mesh,
      total_steps=total_steps, warmup_steps=warmup_steps, teacher=teacher,
      program_dir=compile_cache.programs_directory())

  # With a teacher, batches also carry the captions in the teacher's own ids (its tokenizer).
  teacher_text = teacher.text_stream if teacher is not None else None
  decode, source = trainer.task.decode, train_source  # QA batches add questions, answers
  if tasks_lib.uses_teacher_cache(config):  # batches carry a cached view's mask and target
    source, decode = teacher_cache.for_training(
        config.teacher.cache, teacher_lib.cache_fingerprint(config), source, decode)
  train_loader = pipeline.make_train_loader(
      config.data, tokenizer, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode=decode, source=source, teacher_text=teacher_text)
  # Batches made and put on the mesh ahead of the step, in a thread (data/prefetch.py); the
  # checkpointed position is that of the last batch the loop took.
  depth = config.data.get('prefetch', 0)
  to_mesh = lambda b: sharding_lib.global_batch(b, mesh)
  train_iter = prefetch.Prefetch(iter(train_loader), to_mesh, depth)
  image_iter = None
  if image_every:
    # Another shuffle seed than the videos': on shapes, the stand-in reads the same clips, and
    # the same seed would show each clip's frame right after (or before) the clip itself.
    image_iter = prefetch.Prefetch(iter(pipeline.make_train_loader(
        image_config, tokenizer, global_batch_size=config_lib.image_batch_size(config),
        seed=(config.seed + 1) % 2**32, process_index=jax.process_index(),
        process_count=jax.process_count(), examples='records', teacher_text=teacher_text)),
        to_mesh, depth)

  # --- restore: own workdir -> config.resume -> config.init -> scratch ---
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  def open_manager():
    return checkpointing.make_manager(
        ckpt_dir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing,
        with_image_data=image_iter is not None, keep_period=config.get('keep_period', 0))
  abstract = checkpointing.abstract_with_shardings(trainer.abstract_state,
                                                   trainer.state_shardings)
  # The newest checkpoint that restores; unreadable ones are moved aside with a warning.
  manager, state = checkpointing.restore_latest(
      open_manager(), abstract, train_iter, image_iter=image_iter, reopen=open_manager,
      report=lambda line: print(line, file=sys.stderr) if is_main else None)
  if state is not None:
    logging.info('resumed from %s step %d', ckpt_dir, int(state['step']))
  elif config.resume:
    state, rdir, rstep = checkpointing.restore_given(
        config.resume, abstract, train_iter, image_iter=image_iter,
        report=lambda line: print(line, file=sys.stderr) if is_main else None)
    logging.info('resumed from %s step %d (config.resume)', rdir, rstep)
  else:
    state = trainer.init_state(jax.random.key(config.seed))
    if config.init:  # a whole exported model (ours): fine-tuning, continued pretraining
      state['params'] = exports.load_params_into(config.init, state['params'])
    else:  # external towers: an image tower (CLIP/SigLIP/ViT), a BERT text tower
      if config.model.get('init'):
        state['params'] = _load_tower(config, trainer, state['params'], 'init')
      if config.model.get('text_init'):
        state['params'] = _load_tower(config, trainer, state['params'], 'text_init')
  step = int(state['step'])

  results_path = epath.Path(workdir) / 'results.json'
  if step >= total_steps:
    print(f'run already complete: {workdir} is at step {step} of {total_steps}.')
    if results_path.exists():
      results = json.loads(results_path.read_text())
      print_results(results, is_main)
      manager.close()
      return results

  # --- loop ---
  writer = MetricWriter(workdir, start_step=step)  # rows of replayed steps are replaced
  if is_main and results_path.exists():
    # From a later state than this resume (its checkpoint was unreadable): the final evaluation
    # row went with the replaced rows, so the results are recomputed by this run's final eval.
    results_path.unlink()
  base_key = jax.random.key(config.seed + 1)
  bar = progress_lib.Progress(total_steps, step, enabled=is_main)
  t_last, examples = time.perf_counter(), 0
  last_metrics = None
  # The latest metrics of each kind since the last log, as (step, metrics on device). Image
  # steps are logged under 'image/' in rows of their own step, so the two losses never mix.
  pending = {}
  stop_at = total_steps if config.halt_at_step < 0 else min(config.halt_at_step, total_steps)
  guard = resilience.FiniteGuard(ckpt_dir)
  preemption = resilience.active()  # a signal stops the loop at a step boundary, after saving
  stopped = None
  sharding_lib.sync_processes('train:loop')  # all processes start stepping together
  t_loop, first, start_times = time.perf_counter(), True, {}
  while step < stop_at:
    kind = step_kind(config, step, total_steps)
    if kind == 'image':
      state, metrics = trainer.train_step_image(state, next(image_iter), base_key)
    else:
      batch = next(train_iter)
      step_fn = trainer.train_step_unmasked if kind == 'unmasked' else trainer.train_step
      state, metrics = step_fn(state, batch, base_key)
    examples += config_lib.image_batch_size(config) if kind == 'image' else config.batch_size
    step += 1
    if first:  # compile (or a compilation-cache read) + one step: what a relaunch waits for
      jax.block_until_ready(state['step'])
      first = False
      logging.info('first step done %.1f s after the loop started (%.1f s since the run began)',
                   time.perf_counter() - t_loop, time.perf_counter() - t_start)
      # Wall-clock figures ride on the next logged row (as examples_per_sec), so a relaunch
      # adds no row of its own to metrics.jsonl.
      start_times = {'time/first_step_s': time.perf_counter() - t_loop,
                     'time/start_to_first_step_s': time.perf_counter() - t_start}
    bar.update(1)
    guard.add(step, metrics.pop('finite'))  # on device; fetched on log/checkpoint steps only
    pending['image' if kind == 'image' else 'video'] = (step, metrics)
    log_now = step % config.log_every_steps == 0 or step == total_steps
    save_now = step % config.checkpoint_every_steps == 0 or step == stop_at
    stopped = preemption.stop_requested(step, sync_step=log_now or save_now)
    if log_now or save_now or stopped:
      guard.check(manager, step)  # a non-finite step is never logged as good, nor saved
    if log_now:
      rows = sorted((s, 'image/' if k == 'image' else '', jax.device_get(m))
                    for k, (s, m) in pending.items())
      pending = {}
      now = time.perf_counter()
      rows[-1][2]['examples_per_sec'] = examples / (now - t_last)  # both streams, unprefixed
      rows[-1][2].update(start_times)
      start_times = {}
      t_last, examples = now, 0
      for s, prefix, m in rows:
        writer.write(s, {(k if k in _UNPREFIXED or k.startswith('time/') else prefix + k): v
                         for k, v in m.items()})
        if not prefix:
          bar.log(s, float(m['loss']), float(rows[-1][2]['examples_per_sec']))
          last_metrics = m
    if save_now or stopped:
      checkpointing.save(manager, step, state, config, train_iter, image_iter=image_iter)
    if stopped:
      break
    if periodic_eval_due(config, step, total_steps):
      t_eval = time.perf_counter()
      periodic_eval(config, trainer, state['params'], tokenizer, mesh, writer, step, bar)
      t_last += time.perf_counter() - t_eval  # examples/s counts training time only
  bar.close()
  for it in (train_iter, image_iter):
    if it is not None:
      it.close()
  manager.wait_until_finished()
  manager.close()
  preemption.raise_if_requested()  # a signal that came after the loop's last poll
  if stopped:
    writer.close()
    raise Preempted(f'{preemption.signal_name or "preemption"} at step {step}: saved checkpoint '
                    f'step {step} in {ckpt_dir}')
  if step < total_steps:
    print(f'halted at step {step} of {total_steps} (halt_at_step); run again to resume.')
    writer.close()
    return {'step': step, 'halted': True}

  # --- final evaluation ---
  results = run_evals(config, trainer, state['params'], tokenizer, mesh)
  results['step'] = step
  if last_metrics is not None:
    results['final_train_loss'] = float(last_metrics['loss'])
  elif writer.last('loss') is not None:  # a rerun after a stop during the final evaluation
    results['final_train_loss'] = writer.last('loss')
  writer.write(step, {f'eval/{k}': v for k, v in results.items()
                      if isinstance(v, (int, float))})
  writer.close()
  if is_main:  # the only writer; other processes hold the same (replicated) results
    tmp = results_path.with_name(results_path.name + '.tmp')
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(results_path)
  print_results(results, is_main)
  return results


def periodic_eval_due(config, step: int, total_steps: int) -> bool:
  """Every config.eval_every_steps steps (0: never), except the last (the final evaluation)."""
  every = config.get('eval_every_steps', 0)
  return every > 0 and step % every == 0 and step < total_steps


def periodic_eval(config, trainer, params, tokenizer, mesh, writer, step: int, bar) -> dict:
  """The end-of-run evaluators (run_evals) at `step`: metrics under eval/ in metrics.jsonl and
  TensorBoard, the table printed above the progress bar."""
  results = run_evals(config, trainer, params, tokenizer, mesh)
  writer.write(step, {f'eval/{k}': v for k, v in results.items()
                      if isinstance(v, (int, float))})
  bar.write(f'\nEvaluation at step {step}:\n' + format_results(results))
  return results


def _load_tower(config, trainer, params, field: str):
  """The student's params with the tower of config.model.<field> loaded: 'init' the vision
  tower (clusterstm.load_pretrained), 'text_init' the BERT text tower (load_text_pretrained)."""
  path = os.path.expanduser(config.model[field])
  if not os.path.exists(path):
    raise UserError(f'checkpoint path does not exist: {path} (config.model.{field})')
  load = (clusterstm_lib.load_pretrained if field == 'init'
          else clusterstm_lib.load_text_pretrained)
  try:
    loaded = load(path, jax.device_get(params), trainer.task.model)
  except ValueError as e:
    raise UserError(f'{path}: {e}') from e
  return jax.device_put(loaded, trainer.state_shardings['params'])


def run_evals(config, trainer, params, tokenizer, mesh) -> dict:
  """The end-of-run evaluation: config.evals (fine-tuning runs), else zero-shot retrieval on
  the eval split, contrastive scores only (the same evaluator as `evaluate`, with k = 0)."""
  ctx = evaluators.Context(config=config, params=params, predict_fns=trainer.task.predict_fns,
                           decode=trainer.task.decode, tokenizer=tokenizer, mesh=mesh)
  if config.get('evals'):
    return evaluators.run_evals(config.evals, ctx)
  zero_shot = ml_collections.ConfigDict(dict(
      type='retrieval', split=config.data.eval_split, batch_size=config.eval_batch_size, k=0))
  metrics, _ = evaluators.get('retrieval')(zero_shot, ctx)
  return {f'zeroshot_{k}': float(v) for k, v in metrics.items()}


def print_results(results: dict, is_main: bool = True) -> None:
  if not is_main:
    return
  table = {k[len('zeroshot_'):]: v for k, v in results.items() if k.startswith('zeroshot_')}
  if not table:  # fine-tuning runs
    print('\n' + evaluators.format_results(results))
    return
  print('\nZero-shot text-video retrieval on the test split:')
  print(metrics_lib.format_table(table))


def format_results(results: dict) -> str:
  """The table of run_evals' results (zero-shot retrieval, or config.evals')."""
  table = {k[len('zeroshot_'):]: v for k, v in results.items() if k.startswith('zeroshot_')}
  return metrics_lib.format_table(table) if table else evaluators.format_results(results)
