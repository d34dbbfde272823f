r"""The masking/MRM ablation: several variants x seeds, each its own training run, one table.

  python -m clusterstm_jax.tools.ablate --config=configs/pretrain.py --out=DIR \
      [--seeds=3] [--steps=N] [--variants=clusterstm,random,...] [--config.x=y ...]

Variants (same config, same mask ratio, same step budget, same shared teacher):
  clusterstm              cluster-wise masking, temporal-density pick (the method)
  clusterstm_random_pick  the same clusters, a random token kept per cluster
  random                  uniform random masking per frame
  tube                    one random spatial keep set per clip, the same in every frame
  clusterstm_no_mrm       clusterstm with loss_weights.mrm = 0
The variant sets mask.strategy (and loss_weights.mrm for *_no_mrm); every other field, and every
--config.x=y, is the same for all runs. Seed i of a variant uses config.seed + i (init, masks and
data order all follow it).

Each run lives in DIR/<variant>/seed<seed>/ and is a plain training run (loop.run), so a
sweep that is interrupted resumes when the same command is run again: a run with results.json is
reused without touching jax, a partial one resumes from its latest checkpoint. Each run's config
is stored next to it (ablate_run.json); reusing a run made with different settings is an error.

Runs are sequential and in-process (one jax runtime). Every run builds its own jitted step, so
seeds of one variant would compile the same programs again; jax's persistent compilation cache
(DIR/jax_cache, --nocompile_cache to turn off) makes that a disk read. Order is seed-major
(every variant for seed 0, then seed 1, ...) so a sweep stopped early still compares all variants.
After every run the table is rewritten to DIR/ablation.md and DIR/ablation.json (per-seed values
included); the final table, zero-shot R@1 as mean +- sample std over seeds, is printed.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import flags
import jax

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError

# name -> (mask.strategy, MRM weight or None to keep the config's)
VARIANTS = {
    'clusterstm': ('clusterstm', None),
    'clusterstm_random_pick': ('clusterstm_random_pick', None),
    'random': ('random', None),
    'tube': ('tube', None),
    'clusterstm_no_mrm': ('clusterstm', 0.0),
}
METRICS = ('zeroshot_t2v_R@1', 'zeroshot_v2t_R@1')
RUN_FILE = 'ablate_run.json'
# Fields that change how a run is logged, saved or read, not what it computes: they may differ
# when a sweep is resumed (e.g. halt_at_step to stop early, the data moved to another disk).
BOOKKEEPING = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
               'async_checkpointing', 'halt_at_step', 'eval_batch_size', 'data.data_dir',
               'data.worker_count', 'data.worker_buffer_size', 'data.prefetch', 'data.read_threads',
               'data.read_buffer_size')


def run_config(base, variant: str, seed_offset: int, steps: int | None):
  """The config of one run: `base` with the variant's masking/MRM, the seed and the budget."""
  if variant not in VARIANTS:
    raise UserError(f'unknown variant {variant!r}; known: {", ".join(VARIANTS)}')
  strategy, mrm = VARIANTS[variant]
  config = base.copy_and_resolve_references()
  config.mask.strategy = strategy
  if mrm is not None:
    config.loss_weights.mrm = mrm
  config.seed = base.seed + seed_offset
  if steps is not None:
    config.total_steps = steps
    config.total_epochs = -1.0
    config.total_examples = -1
  return config


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def fingerprint(config) -> dict:
  """The run's config as flat JSON values, without the bookkeeping fields."""
  flat = _flatten(json.loads(config.to_json_best_effort(sort_keys=True)))
  return {k: v for k, v in flat.items() if k not in BOOKKEEPING}


def run_one(config, workdir: str) -> dict:
  """Trains (or resumes, or reuses) one run; returns its results dict."""
  stored_path = os.path.join(workdir, RUN_FILE)
  want = fingerprint(config)
  if os.path.exists(stored_path):
    with open(stored_path) as f:
      have = json.load(f)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
      shown = ', '.join(f'{k}: {have.get(k)!r} -> {want.get(k)!r}' for k in diff[:3])
      raise UserError(f'{workdir} was trained with other settings ({shown}); use a new --out '
                      'or the same settings')
  elif os.path.isdir(workdir) and os.listdir(workdir):
    raise UserError(f'{workdir} exists but was not made by ablate (no {RUN_FILE}); use a new --out')
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(stored_path + '.tmp', 'w') as f:
      json.dump(want, f, indent=1, sort_keys=True)
    os.replace(stored_path + '.tmp', stored_path)
  results_path = os.path.join(workdir, 'results.json')
  if os.path.exists(results_path):  # written last, atomically: the run is complete
    with open(results_path) as f:
      return json.load(f)
  return loop.run(config, workdir)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (n - 1); std is None below two values."""
  n = len(values)
  if n == 0:
    return None, None
  mean = sum(values) / n
  if n < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(per_seed: dict[str, dict[int, dict]], variants: list[str], seeds: list[int],
              setup: dict) -> dict:
  """The JSON summary: per variant, per-seed metrics and mean/std of each metric in METRICS."""
  out = {'setup': setup, 'metrics': list(METRICS), 'variants': {}}
  for v in variants:
    runs = per_seed.get(v, {})
    entry = {
        'mask_strategy': VARIANTS[v][0],
        'mrm_weight': setup['mrm_weight'] if VARIANTS[v][1] is None else VARIANTS[v][1],
        'seeds': seeds,
        'complete': all(s in runs for s in seeds),
        'per_seed': {str(s): runs[s] for s in seeds if s in runs},
    }
    for m in METRICS:
      values = [runs[s][m] for s in seeds if s in runs]
      mean, std = mean_std(values)
      entry[m] = {'mean': mean, 'std': std, 'n': len(values), 'values': values}
    out['variants'][v] = entry
  return out


def _cell(stat: dict) -> str:
  if stat['mean'] is None:
    return '-'
  std = '-' if stat['std'] is None else f"{stat['std']:.1f}"
  return f"{stat['mean']:.1f} ± {std}"


def format_markdown(summary: dict) -> str:
  s = summary['setup']
  lines = [
      f"# Ablation on {s['dataset']}: zero-shot retrieval R@1 (%), mean ± sample std over seeds",
      '',
      f"{s['steps']} steps, batch {s['batch_size']}, mask ratio {s['mask_ratio']}, "
      f"seeds {s['seeds']}, teacher {s['teacher']}, eval split {s['eval_split']}.",
  ] + ([f"Command: `{s['command']}`"] if s['command'] else []) + [
      '',
      '| variant | mask | MRM weight | t2v R@1 | v2t R@1 | seeds done |',
      '|---|---|---|---|---|---|',
  ]
  for name, e in summary['variants'].items():
    t2v, v2t = e['zeroshot_t2v_R@1'], e['zeroshot_v2t_R@1']
    lines.append(f"| {name} | {e['mask_strategy']} | {e['mrm_weight']:g} | {_cell(t2v)} | "
                 f"{_cell(v2t)} | {t2v['n']}/{len(e['seeds'])} |")
  lines += ['', 'Per seed (t2v / v2t R@1):', '',
            '| variant | ' + ' | '.join(f'seed {x}' for x in s['seeds']) + ' |',
            '|---|' + '---|' * len(s['seeds'])]
  for name, e in summary['variants'].items():
    cells = []
    for x in s['seeds']:
      r = e['per_seed'].get(str(x))
      cells.append('-' if r is None else
                   f"{r['zeroshot_t2v_R@1']:.1f} / {r['zeroshot_v2t_R@1']:.1f}")
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_tables(out_dir: str, summary: dict) -> str:
  md = format_markdown(summary)
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


def run_sweep(base, out_dir: str, *, variants: list[str], num_seeds: int,
              steps: int | None = None, command: str = '', compile_cache: bool = True) -> dict:
  """Runs every (seed, variant) in `out_dir`, seed-major; returns the summary (ablation.json)."""
  if num_seeds < 1:
    raise UserError(f'--seeds={num_seeds} must be at least 1')
  if steps is not None and steps < 1:
    raise UserError(f'--steps={steps} must be at least 1')
  if not variants:
    raise UserError('--variants is empty')
  for v in variants:
    if v not in VARIANTS:
      raise UserError(f'unknown variant {v!r}; known: {", ".join(VARIANTS)}')
  if len(set(variants)) != len(variants):
    raise UserError(f'--variants has duplicates: {",".join(variants)}')
  os.makedirs(out_dir, exist_ok=True)
  if compile_cache:
    use_compile_cache(os.path.join(out_dir, 'jax_cache'))
  seeds = [base.seed + i for i in range(num_seeds)]
  first = run_config(base, variants[0], 0, steps)
  train_size = None
  if first.total_steps < 0:  # epochs/examples: the table reports the resolved steps
    train_size = len(pipeline.get_source(first.data, first.data.train_split))
  setup = {
      'dataset': ':'.join(x for x in (first.data.name, first.data.builder_config) if x),
      'steps': config_lib.steps('total', first, data_size=train_size,
                                batch_size=first.batch_size),
      'batch_size': first.batch_size, 'mask_ratio': first.mask.ratio,
      'mrm_weight': base.loss_weights.mrm, 'seeds': seeds,
      'teacher': first.teacher.export or first.teacher.workdir,
      'eval_split': first.data.eval_split, 'command': command,
  }
  per_seed: dict[str, dict[int, dict]] = {}
  for i, seed in enumerate(seeds):
    for v in variants:
      workdir = os.path.join(out_dir, v, f'seed{seed}')
      t0 = time.perf_counter()
      print(f'\n=== ablate: {v} seed {seed} -> {workdir}', flush=True)
      results = run_one(run_config(base, v, i, steps), workdir)
      if results.get('halted'):
        print(f'halted at step {results["step"]} (halt_at_step); run the same command again to '
              'resume the sweep.', flush=True)
        return summarize(per_seed, variants, seeds, setup)
      per_seed.setdefault(v, {})[seed] = {k: results[k] for k in sorted(results)
                                          if k.startswith('zeroshot_')}
      print(f'=== ablate: {v} seed {seed} done in {time.perf_counter() - t0:.0f}s: ' +
            ', '.join(f'{m} {results[m]:.1f}' for m in METRICS), flush=True)
      write_tables(out_dir, summarize(per_seed, variants, seeds, setup))
  summary = summarize(per_seed, variants, seeds, setup)
  print('\n' + write_tables(out_dir, summary))
  return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config('configs/pretrain.py',
                    'Base config (configs/*.py[:arg]); --config.x=y applies to all.')
  flags.DEFINE_string('out', None, 'Sweep directory: one workdir per run, plus the tables.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per variant (config.seed, config.seed + 1, ...).')
  flags.DEFINE_integer('steps', None, 'Training steps of every run (default: the config\'s).')
  flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {",".join(VARIANTS)}.')
  flags.DEFINE_bool('compile_cache', True, 'Keep compiled programs in DIR/jax_cache so that '
                    'runs after the first of each variant skip compilation.')


def main() -> None:
  command = ' '.join(['python -m clusterstm_jax.tools.ablate'] + sys.argv[1:])
  run_sweep(FLAGS.config, FLAGS.out, variants=FLAGS.variants, num_seeds=FLAGS.seeds,
            steps=FLAGS.steps, compile_cache=FLAGS.compile_cache, command=command)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['out'])
  cli.run(main)
