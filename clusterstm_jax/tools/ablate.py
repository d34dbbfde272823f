r"""The masking/MRM ablation: datasets x variants x paired seeds, each its own training run,
evaluated before and after unmasked tuning; paired differences with bootstrap intervals.

  python -m clusterstm_jax.tools.ablate --config=configs/pretrain.py --out=DIR \
      [--datasets=default,distractors] [--seeds=3] [--steps=N] [--tune_steps=K] \
      [--variants=clusterstm,random,...] [--tables_only] [--config.x=y ...]

Variants (same config, same mask ratio, same step budget, the same teacher per dataset):
  clusterstm              cluster-wise masking, temporal-density pick (the method; the reference)
  clusterstm_random_pick  the same clusters, a random token kept per cluster
  random                  uniform random masking per frame
  tube                    one random spatial keep set per clip, the same in every frame
  clusterstm_no_mrm       clusterstm with loss_weights.mrm = 0
The variant sets mask.strategy (and loss_weights.mrm for *_no_mrm); --datasets sets
data.builder_config (shapes: default, distractors; tiny, tiny_distractors for tests; empty = the
config's). Every other field, and every --config.x=y, is the same for all runs.

Paired seeds: seed i of every variant and dataset is config.seed + i, and the seed is all that
decides the init (jax.random.key(seed); the variants share one parameter tree), the data order
(grain's shuffle seed) and every step's randomness (fold_in(key(seed + 1), step): random masks,
VTM negatives, MLM), so differences between variants at one seed are the variants' own.

One run: --steps masked steps, then --tune_steps unmasked steps (every token, no teacher; FLIP /
UMT's unmasked tuning; total_steps = steps + tune_steps, unmasked_steps = tune_steps; the
tuning steps restart at config.optax.unmasked_lr on a cosine of their own, or with 0 take the
main cosine's tail). The run halts at the end of the masked steps; its checkpoint there
is evaluated ('before'), then it resumes through the tuning steps and is evaluated again
('after'). Each evaluation ranks every query of the val and test splits (zero-shot, contrastive)
and stores the per-query ranks, which the tables pool (tools/ablate_stats.py).

Resumable: each run lives in DIR/<dataset>/<variant>/seed<seed>/ with its config fingerprint
(ablate_run.json; other settings there are an error), before.json and after.json (written
atomically, after.json last): a finished run is not touched again; an interrupted one resumes
from its latest checkpoint (loop.run), its 'before' evaluation is reused once written. Teachers
live in DIR/teachers/<dataset>/ (trained by the first run of each dataset, then reused).
Order is seed-major (every dataset and variant for seed 0, then seed 1, ...), so a sweep stopped
early still compares all variants. After every run DIR/ablation.md and DIR/ablation.json are
rewritten. Compiled programs are kept in DIR/jax_cache (--nocompile_cache: off).

A finished run's three JSON files are all the tables need (tens of KB; docs/ablation/ holds the
documented sweep's): copied into another DIR with the same layout, the sweep command with
--tables_only rewrites the tables there and trains nothing, and without it continues with the
runs not there (e.g. more seeds), reusing the copied ones.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
import jax
import ml_collections
import numpy as np

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax import evaluators
from clusterstm_jax import loading
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import checks
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import metrics as metrics_lib
from clusterstm_jax.evaluators import retrieval
from clusterstm_jax.tools import ablate_stats as stats

# name -> (mask.strategy, MRM weight or None to keep the config's)
VARIANTS = {
    'clusterstm': ('clusterstm', None),
    'clusterstm_random_pick': ('clusterstm_random_pick', None),
    'random': ('random', None),
    'tube': ('tube', None),
    'clusterstm_no_mrm': ('clusterstm', 0.0),
}
REFERENCE = 'clusterstm'
POOLED_SPLITS = ('val', 'test')
RUN_FILE = 'ablate_run.json'
# Fields that change how a run is logged, saved or read, not what it computes: they may differ
# when a sweep is resumed (e.g. the data moved to another disk). halt_at_step is ablate's own.
BOOKKEEPING = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'keep_period',
               'async_checkpointing', 'halt_at_step', 'eval_batch_size', 'data.data_dir',
               'data.worker_count', 'data.worker_buffer_size', 'data.prefetch',
               'data.read_threads', 'data.read_buffer_size', 'teacher.workdir')


def run_config(base, variant: str, seed_offset: int, steps: int, tune_steps: int,
               dataset: str = '', teacher_dir: str = ''):
  """The config of one run: `base` with the variant's masking/MRM, the dataset, the seed, the
  budget (steps masked + tune_steps unmasked, one schedule) and the dataset's teacher."""
  if variant not in VARIANTS:
    raise UserError(f'unknown variant {variant!r}; known: {", ".join(VARIANTS)}')
  strategy, mrm = VARIANTS[variant]
  config = base.copy_and_resolve_references()
  config.mask.strategy = strategy
  if mrm is not None:
    config.loss_weights.mrm = mrm
  if dataset:
    config.data.builder_config = dataset
  if teacher_dir and not (config.teacher.get('init') or config.teacher.export):
    config.teacher.workdir = teacher_dir
  config.seed = base.seed + seed_offset
  config.total_steps = steps + tune_steps
  config.total_epochs = -1.0
  config.total_examples = -1
  config.unmasked_steps = tune_steps
  config.halt_at_step = -1
  # The checkpoint at the end of the masked steps is never deleted (keep_checkpoints would drop
  # it once the tuning saves twice): the tuning can be redone from it, e.g. with another lr.
  config.keep_period = steps
  return config


def fingerprint(config) -> dict:
  """The run's config as flat JSON values, without the bookkeeping fields."""
  return config_lib.flat_fields(config, BOOKKEEPING)


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f)
  os.replace(path + '.tmp', path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def check_fingerprint(config, workdir: str) -> bool:
  """False when the workdir has no fingerprint; raises when it holds another config's."""
  stored_path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(stored_path):
    return False
  have, want = _read_json(stored_path), fingerprint(config)
  diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
  if diff:
    shown = ', '.join(f'{k}: {have.get(k)!r} -> {want.get(k)!r}' for k in diff[:3])
    raise UserError(f'{workdir} was trained with other settings ({shown}); use a new --out '
                    'or the same settings')
  return True


def claim_workdir(config, workdir: str) -> None:
  """Records the run's fingerprint in a new workdir, or checks it against the stored one."""
  stored_path = os.path.join(workdir, RUN_FILE)
  if check_fingerprint(config, workdir):
    return
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise UserError(f'{workdir} exists but was not made by ablate (no {RUN_FILE}); use a new --out')
  else:
    os.makedirs(workdir, exist_ok=True)
    _write_json(stored_path, fingerprint(config))


def query_ranks(config, workdir: str, step: int) -> dict:
  """Zero-shot retrieval of the run's checkpoint at `step`: {split: {'t2v': ranks, 'v2t':
  ranks}} over the splits of POOLED_SPLITS the dataset has (else its eval split), every query
  ranked against its own split's gallery by the contrastive similarity (loop.run_evals')."""
  mesh = sharding_lib.make_mesh(config.mesh)
  tokenizer = pipeline.get_tokenizer(config.data)
  params = loading.restore_params(config, os.path.join(workdir, 'checkpoints'), step, mesh,
                                  tokenizer.vocab_size)
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  ctx = evaluators.Context(config=config, params=params, predict_fns=task.predict_fns,
                           decode=task.decode, tokenizer=tokenizer, mesh=mesh)
  have = checks.split_names(config.data)
  splits = [x for x in POOLED_SPLITS if x in have] or [config.data.eval_split]
  out = {}
  for split in splits:
    ev = ml_collections.ConfigDict(dict(type='retrieval', split=split, k=0,
                                        batch_size=config.eval_batch_size))
    video, text, _ = retrieval.encode_split(
        ctx.loader(ev), mesh, ctx.jit(task.predict_fns['embed_video']),
        ctx.jit(task.predict_fns['embed_text']), params)
    sim = retrieval.similarity(video, text)  # text i describes video i
    gt = np.arange(sim.shape[0])
    out[split] = {'t2v': metrics_lib.retrieval_ranks(sim, gt).tolist(),
                  'v2t': metrics_lib.retrieval_ranks(sim.T, gt).tolist()}
  return out


def _stage_paths(workdir: str) -> list[str]:
  return [os.path.join(workdir, f'{x}.json') for x in stats.STAGES]


def _read_stages(workdir: str) -> dict | None:
  """{'before', 'after'} evaluations when the run finished (after.json is written last)."""
  paths = _stage_paths(workdir)
  if not os.path.exists(paths[-1]):
    return None
  return {stage: _read_json(path) for stage, path in zip(stats.STAGES, paths)}


def read_finished(config, workdir: str) -> dict | None:
  """A finished run's evaluations (its fingerprint checked), else None."""
  if not check_fingerprint(config, workdir):
    return None
  return _read_stages(workdir)


def run_one(config, workdir: str, steps: int) -> dict:
  """Trains, evaluates, tunes and evaluates one run (or resumes it, or reuses it);
  returns {'before': evaluation, 'after': evaluation}. `config` is run_config's."""
  claim_workdir(config, workdir)  # checks the fingerprint once
  finished = _read_stages(workdir)
  if finished is not None:
    return finished
  before_path, after_path = _stage_paths(workdir)
  if not os.path.exists(before_path):
    masked = config.copy_and_resolve_references()
    masked.halt_at_step = steps  # saves a checkpoint at `steps` and returns
    result = loop.run(masked, workdir)
    if not result.get('halted') or result['step'] != steps:
      raise UserError(f'{workdir}: expected the run to halt at step {steps} before its unmasked '
                      f'tuning, it returned at step {result.get("step")}; use a new --out')
    _write_json(before_path, query_ranks(config, workdir, steps))
  before = _read_json(before_path)
  loop.run(config, workdir)  # resumes at `steps`: the unmasked tuning steps, then its own eval
  after = query_ranks(config, workdir, config.total_steps)
  _write_json(after_path, after)
  return {'before': before, 'after': after}


def write_tables(out_dir: str, summary: dict) -> str:
  md = stats.format_markdown(summary)
  for name, text in (('ablation.md', md), ('ablation.json', json.dumps(summary, indent=1))):
    path = os.path.join(out_dir, name)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  return md


def use_compile_cache(path: str) -> None:
  """Persists compiled programs in `path` unless the caller already chose a cache directory."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', path)


def _summary(setup: dict, runs: dict, variants: list[str]) -> dict:
  return {'setup': setup,
          'datasets': {d: stats.summarize(runs.get(d, {}), variants, setup['seeds'], REFERENCE)
                       for d in setup['datasets']}}


def run_sweep(base, out_dir: str, *, variants: list[str], num_seeds: int, steps: int,
              tune_steps: int, datasets: list[str] | None = None, command: str = '',
              compile_cache: bool = True, tables_only: bool = False) -> dict:
  """Runs every (seed, dataset, variant) in `out_dir`, seed-major; returns the summary
  (ablation.json). tables_only: trains nothing, tabulates the finished runs there."""
  if num_seeds < 1:
    raise UserError(f'--seeds={num_seeds} must be at least 1')
  if steps < 1 or tune_steps < 1:
    raise UserError(f'--steps={steps} and --tune_steps={tune_steps} must be at least 1')
  if not variants:
    raise UserError('--variants is empty')
  for v in variants:
    if v not in VARIANTS:
      raise UserError(f'unknown variant {v!r}; known: {", ".join(VARIANTS)}')
  if REFERENCE not in variants:
    raise UserError(f'--variants must include {REFERENCE} (the paired differences\' reference)')
  datasets = list(datasets or [base.data.builder_config])
  for name in (variants, datasets):
    if len(set(name)) != len(name):
      raise UserError(f'duplicates in {",".join(name)}')
  if base.halt_at_step >= 0:
    raise UserError('--config.halt_at_step: ablate halts its runs itself; stop a sweep with a '
                    'signal (SIGTERM/SIGINT save a checkpoint) and rerun the command to resume')
  for d in datasets:  # before any training: a misspelt dataset fails now
    checks.split_names(run_config(base, REFERENCE, 0, steps, tune_steps, d).data)
  if tables_only and not os.path.isdir(out_dir):
    raise UserError(f'--tables_only: {out_dir} does not exist')
  os.makedirs(out_dir, exist_ok=True)
  if compile_cache and not tables_only:
    use_compile_cache(os.path.join(out_dir, 'jax_cache'))
  seeds = [base.seed + i for i in range(num_seeds)]
  first = run_config(base, REFERENCE, 0, steps, tune_steps, datasets[0])
  have = checks.split_names(first.data)
  setup = {
      'datasets': datasets, 'masked_steps': steps, 'tune_steps': tune_steps,
      'batch_size': first.batch_size, 'mask_ratio': first.mask.ratio,
      'mrm_weight': base.loss_weights.mrm, 'seeds': seeds, 'reference': REFERENCE,
      'unmasked_lr': float(base.optax.get('unmasked_lr', 0.0)),
      'splits': [x for x in POOLED_SPLITS if x in have] or [first.data.eval_split],
      'command': command,
  }
  runs: dict = {}  # dataset -> variant -> seed -> {'before', 'after'}
  unfinished = []
  for i, seed in enumerate(seeds):
    for d in datasets:
      teacher_dir = os.path.join(out_dir, 'teachers', d)
      for v in variants:
        workdir = os.path.join(out_dir, d, v, f'seed{seed}')
        config = run_config(base, v, i, steps, tune_steps, d, teacher_dir)
        if tables_only:
          result = read_finished(config, workdir)
          if result is None:
            unfinished.append(workdir)
          else:
            runs.setdefault(d, {}).setdefault(v, {})[seed] = result
          continue
        t0 = time.perf_counter()
        print(f'\n=== ablate: {d} {v} seed {seed} -> {workdir}', flush=True)
        result = run_one(config, workdir, steps)
        runs.setdefault(d, {}).setdefault(v, {})[seed] = result
        print(f'=== ablate: {d} {v} seed {seed} done in {time.perf_counter() - t0:.0f}s: ' +
              ', '.join(f'{st} {x} R@1 {stats.recall(stats.pooled_ranks(result[st], x)):.1f}'
                        for st in stats.STAGES for x in stats.DIRECTIONS), flush=True)
        write_tables(out_dir, _summary(setup, runs, variants))
  if unfinished:
    print(f'--tables_only: {len(unfinished)} of {len(seeds) * len(datasets) * len(variants)} '
          f'runs not finished, left out of the tables: {", ".join(unfinished)}', flush=True)
  summary = _summary(setup, runs, variants)
  print('\n' + write_tables(out_dir, summary))
  return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config('configs/pretrain.py',
                    'Base config (configs/*.py[:arg]); --config.x=y applies to all.')
  flags.DEFINE_string('out', None, 'Sweep directory: one workdir per run, plus the tables.')
  flags.DEFINE_list('datasets', [], 'shapes builder configs (data.builder_config) to run on, '
                    'e.g. default,distractors; empty: the config\'s.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per variant (config.seed, config.seed + 1, ...).')
  flags.DEFINE_integer('steps', 160, 'Masked training steps of every run.')
  flags.DEFINE_integer('tune_steps', 20, 'Unmasked tuning steps after them (>= 1).')
  flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {",".join(VARIANTS)}.')
  flags.DEFINE_bool('tables_only', False, 'Train nothing: rewrite DIR/ablation.md and '
                    '.json from the runs finished there (the others are counted and left out).')
  flags.DEFINE_bool('compile_cache', True, 'Keep compiled programs in DIR/jax_cache so that '
                    'runs after the first of each variant skip compilation.')


def main() -> None:
  # The command that trains the sweep (a --tables_only rerun records the same one).
  command = ' '.join(['python -m clusterstm_jax.tools.ablate'] +
                     [a for a in sys.argv[1:] if a not in ('--tables_only', '--tables_only=true')])
  run_sweep(FLAGS.config, FLAGS.out, variants=FLAGS.variants, num_seeds=FLAGS.seeds,
            steps=FLAGS.steps, tune_steps=FLAGS.tune_steps, datasets=FLAGS.datasets,
            compile_cache=FLAGS.compile_cache, command=command, tables_only=FLAGS.tables_only)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['out'])
  cli.run(main)
