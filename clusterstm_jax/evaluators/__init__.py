"""Evaluators by type: each is `run(ev, ctx) -> (metrics, details)`, given an evaluator config
`ev` and a `common.Context` (params, the task's prediction functions, tokenizer, mesh). They never
see a model, a trainer or an entry point.

  retrieval  text-video retrieval (contrastive, re-ranked by the matching head when ev.k > 0)
  qa         open-ended VideoQA from a fixed answer list: top-1 accuracy
  caption    greedy or beam decoding: BLEU-4, ROUGE-L, CIDEr
"""
from __future__ import annotations

from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import captioning
from clusterstm_jax.evaluators import common
from clusterstm_jax.evaluators import metrics as metrics_lib
from clusterstm_jax.evaluators import qa
from clusterstm_jax.evaluators import retrieval

EVALUATORS = {'retrieval': retrieval.run, 'qa': qa.run, 'caption': captioning.run}
Context = common.Context


def get(kind: str):
  if kind not in EVALUATORS:
    raise UserError(f'unknown evaluator type {kind!r}; known: {sorted(EVALUATORS)}')
  return EVALUATORS[kind]


def evaluate(ev, ctx: common.Context):
  """Evaluator `ev` -> (metrics, details); metrics also hold the split's coverage: num_items
  (records evaluated) and num_listed (in the annotations; the rest were skipped by the build)."""
  metrics, details = get(ev.type)(ev, ctx)
  kept, listed = pipeline.split_coverage(ctx.config.data, ev.split or ctx.config.data.eval_split)
  return {**metrics, 'num_items': float(kept), 'num_listed': float(listed)}, details


def run_evals(evals, ctx: common.Context) -> dict[str, float]:
  """Every evaluator of `evals` ({name: {type, ...}}) -> {'name/metric': value}."""
  results = {}
  for name, ev in evals.items():
    metrics, _ = evaluate(ev, ctx)
    results.update({f'{name}/{k}': float(v) for k, v in metrics.items()})
  return results


def coverage_line(m: dict) -> str:
  """'over N of M test items (K skipped by the build)' of an evaluator's metrics."""
  if 'num_items' not in m:
    return ''
  n, listed = int(m['num_items']), int(m['num_listed'])
  return f'  over {n} of {listed} test items ({listed - n} skipped by the build)'



def format_results(results: dict) -> str:
  """Tables of {'name/metric': value} results, one block per evaluator name."""
  groups = {}
  for key, value in results.items():
    if '/' in key:
      name, metric = key.split('/', 1)
      groups.setdefault(name, {})[metric] = value
  lines = []
  for name, m in groups.items():
    cover = coverage_line(m)
    m = {k: v for k, v in m.items() if k not in ('num_items', 'num_listed')}
    if 'itc_t2v_R@1' in m:
      lines.append(f'{name}: text-video retrieval over {m.get("num_videos", 0):.0f} videos, '
                   'contrastive top-k re-ranked by the matching head:')
      lines.append(metrics_lib.format_table({k: v for k, v in m.items() if k[:4] in
                                             ('t2v_', 'v2t_')}))
      lines.append('contrastive scores only:')
      lines.append(metrics_lib.format_table({k[4:]: v for k, v in m.items()
                                             if k.startswith('itc_')}))
    elif 't2v_R@1' in m:
      lines.append(f'{name}: text-video retrieval, contrastive scores:')
      lines.append(metrics_lib.format_table(m))
    elif 'acc' in m:
      kinds = ', '.join(f'{k[4:]} {v:.1f}' for k, v in m.items() if k.startswith('acc_'))
      lines.append(f'{name}: VideoQA top-1 accuracy {m["acc"]:.1f}% over '
                   f'{m["num_questions"]:.0f} questions ({kinds})')
      if 'num_answers' in m:
        lines.append(f'  answers ranked from a list of {m["num_answers"]:.0f}; '
                     f'{m["num_out_of_list"]:.0f} questions have an answer outside it '
                     '(counted wrong)')
    else:
      lines.append(f'{name}: ' + '  '.join(f'{k} {v:.1f}' for k, v in m.items()))
    if cover:
      lines.append(cover)
  return '\n'.join(lines)
