"""The ablation's statistics and tables (numpy only): R@k from per-query ranks, paired
differences against the reference variant with bootstrap confidence intervals, markdown.

A run's evaluation is a dict {split: {'t2v': ranks, 'v2t': ranks}} of 1-based ranks, one per
query; the metrics pool the queries of every split (val + test on shapes: each split is ranked
against its own gallery, as the protocol does; pooling doubles the queries, not the gallery).

Pairing: variant v and the reference r with the same seed share init, data order and per-step
randomness, and are evaluated on the same queries, so d[s, q] = hit_v[s, q] - hit_r[s, q] is a
paired difference. Its 95% interval is a percentile bootstrap that resamples seeds and queries
independently (both are samples: a new seed is another training run, a new query another clip),
with a fixed rng so that a table is reproducible.
"""
from __future__ import annotations

import numpy as np

DIRECTIONS = ('t2v', 'v2t')
STAGES = ('before', 'after')  # before / after the unmasked tuning steps
BOOTSTRAP_SAMPLES = 10000
BOOTSTRAP_SEED = 0


def pooled_ranks(evaluation: dict, direction: str) -> np.ndarray:
  """The ranks of one direction over every split of an evaluation, splits in sorted order."""
  return np.concatenate([np.asarray(evaluation[split][direction], np.int64)
                         for split in sorted(evaluation)])


def recall(ranks: np.ndarray, k: int = 1) -> float:
  """R@k in percent."""
  return float(np.mean(np.asarray(ranks) <= k) * 100.0)


def bootstrap_ci(diff, *, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                 seed: int = BOOTSTRAP_SEED, chunk: int = 1000) -> tuple[float, float, float]:
  """(mean, low, high) of the mean of diff [seeds, queries], with a percentile bootstrap
  interval at `level` that resamples seeds and queries with replacement, independently."""
  diff = np.asarray(diff, np.float64)
  if diff.ndim != 2 or 0 in diff.shape:
    raise ValueError(f'diff must be [seeds, queries] with both > 0, got shape {diff.shape}')
  n_s, n_q = diff.shape
  rng = np.random.default_rng(seed)
  stats = []
  for start in range(0, samples, chunk):
    b = min(chunk, samples - start)
    w_s = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=b)  # [b, S] resample counts
    w_q = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=b)  # [b, Q]
    stats.append(np.einsum('bq,bq->b', w_s @ diff, w_q) / (n_s * n_q))
  stats = np.concatenate(stats)
  alpha = (1.0 - level) / 2
  low, high = np.quantile(stats, [alpha, 1.0 - alpha])
  return float(diff.mean()), float(low), float(high)


def paired_difference(runs: dict, variant: str, reference: str, stage: str, direction: str,
                      k: int = 1) -> dict | None:
  """R@k of `variant` minus `reference` (percentage points) over the seeds both have finished.

  runs: {variant: {seed: {stage: evaluation}}}. None when no seed has both.
  """
  a, b = runs.get(variant, {}), runs.get(reference, {})
  seeds = sorted(s for s in a if s in b and stage in a[s] and stage in b[s])
  if not seeds:
    return None
  hit = lambda r: (pooled_ranks(r, direction) <= k).astype(np.float64)
  diff = np.stack([hit(a[s][stage]) - hit(b[s][stage]) for s in seeds]) * 100.0
  mean, low, high = bootstrap_ci(diff)
  per_seed = diff.mean(axis=1)
  return {'mean': mean, 'low': low, 'high': high, 'seeds': seeds,
          'per_seed': [float(x) for x in per_seed], 'positive': int(np.sum(per_seed > 0))}


def summarize(runs: dict, variants: list[str], seeds: list[int], reference: str) -> dict:
  """Per variant: per-seed R@1 by stage and direction, their mean, and the paired difference
  against `reference` with its interval. runs as in paired_difference."""
  out = {}
  for v in variants:
    entry = {'seeds_done': sorted(s for s in runs.get(v, {}) if 'after' in runs[v][s]),
             'r1': {}, 'diff': {}}
    for stage in STAGES:
      for d in DIRECTIONS:
        key = f'{stage}/{d}'
        values = {s: recall(pooled_ranks(runs[v][s][stage], d))
                  for s in seeds if stage in runs.get(v, {}).get(s, {})}
        entry['r1'][key] = {'per_seed': {str(s): x for s, x in values.items()},
                            'mean': float(np.mean(list(values.values()))) if values else None}
        if v != reference:
          entry['diff'][key] = paired_difference(runs, v, reference, stage, d)
    out[v] = entry
  return out


def _r1(stat: dict) -> str:
  return '-' if stat['mean'] is None else f"{stat['mean']:.1f}"


def _diff(stat: dict | None) -> str:
  if stat is None:
    return '-'
  return (f"{stat['mean']:+.1f} [{stat['low']:+.1f}, {stat['high']:+.1f}] "
          f"({stat['positive']}/{len(stat['seeds'])})")


def format_markdown(summary: dict) -> str:
  """The tables of a sweep summary (ablate.run_sweep's ablation.json)."""
  s = summary['setup']
  ref = s['reference']
  lines = [
      '# Ablation: zero-shot retrieval R@1 (%), val + test queries pooled',
      '',
      f"{s['masked_steps']} masked steps, then {s['tune_steps']} unmasked tuning steps ("
      + (f"their own cosine from lr {s['unmasked_lr']:g}" if s.get('unmasked_lr') else
         "one cosine schedule over both") + f"); batch {s['batch_size']}, mask ratio {s['mask_ratio']}, seeds "
      f"{s['seeds']} (each seed: the same init, data order and step randomness for every "
      f"variant); splits {'+'.join(s['splits'])}; one teacher per dataset.",
  ] + ([f"Command: `{s['command']}`"] if s['command'] else []) + [
      '',
      f'Paired difference against {ref} (percentage points), mean over seeds and queries, '
      f'[95% bootstrap interval over seeds and queries] (seeds where the variant is ahead):',
  ]
  for dataset, per_variant in summary['datasets'].items():
    lines += ['', f'## {dataset}', '',
              '| variant | seeds | t2v before | v2t before | t2v after | v2t after |',
              '|---|---|---|---|---|---|']
    for name, e in per_variant.items():
      n = f"{len(e['seeds_done'])}/{len(s['seeds'])}"
      cells = [_r1(e['r1'][f'{st}/{d}']) for st in STAGES for d in DIRECTIONS]
      lines.append(f'| {name} | {n} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'| variant - {ref} | t2v before | v2t before | t2v after | v2t after |',
              '|---|---|---|---|---|']
    for name, e in per_variant.items():
      if name != ref:
        cells = [_diff(e['diff'].get(f'{st}/{d}')) for st in STAGES for d in DIRECTIONS]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
