"""The ablation sweep tool on the smoke config: tables, per-seed values, reuse and resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import pretrain
from clusterstm_jax.errors import UserError
from clusterstm_jax.tools import ablate

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ['clusterstm', 'random']
STEPS = 2


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('ablate')
  return {'data': str(root / 'data'), 'teacher': str(root / 'teacher'), 'root': root}


def base_config(dirs, **overrides):
  config = pretrain.get_config('smoke')
  config.data.data_dir = dirs['data']
  config.teacher.workdir = dirs['teacher']
  config.async_checkpointing = False
  # Overrides shared by every run; VTM and MLM off keeps compilation short (MRM, the ablated
  # term, stays on).
  config.loss_weights.vtm = 0.0
  config.loss_weights.mlm = 0.0
  for k, v in overrides.items():
    config[k] = v
  config.lock()
  return config


def metric_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f if 'loss' in json.loads(line)]


def line_counts(out):
  return {(v, s): sum(1 for _ in open(os.path.join(out, v, f'seed{s}', 'metrics.jsonl')))
          for v in VARIANTS for s in (0, 1)}


def test_mean_std_is_sample_std():
  assert ablate.mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, np.std([1, 2, 6], ddof=1)))
  assert ablate.mean_std([4.0]) == (4.0, None)
  assert ablate.mean_std([]) == (None, None)


def test_summary_of_a_partial_sweep():
  setup = dict(dataset='shapes', steps=3, batch_size=4, mask_ratio=0.85, mrm_weight=1.0,
               seeds=[0, 1], teacher='t', eval_split='test', command='')
  runs = {'clusterstm_no_mrm': {0: {'zeroshot_t2v_R@1': 1.0, 'zeroshot_v2t_R@1': 2.0},
                                1: {'zeroshot_t2v_R@1': 3.0, 'zeroshot_v2t_R@1': 2.0}},
          'tube': {1: {'zeroshot_t2v_R@1': 5.0, 'zeroshot_v2t_R@1': 4.0}}}
  summary = ablate.summarize(runs, ['clusterstm_no_mrm', 'tube', 'random'], [0, 1], setup)
  e = summary['variants']['clusterstm_no_mrm']
  assert e['complete'] and e['mrm_weight'] == 0.0 and e['mask_strategy'] == 'clusterstm'
  assert e['zeroshot_t2v_R@1'] == {'mean': 2.0, 'std': pytest.approx(2 ** 0.5), 'n': 2,
                                   'values': [1.0, 3.0]}
  assert not summary['variants']['tube']['complete']
  assert summary['variants']['tube']['per_seed'] == {'1': runs['tube'][1]}
  md = ablate.format_markdown(summary)
  assert '| clusterstm_no_mrm | clusterstm | 0 | 2.0 ± 1.4 | 2.0 ± 0.0 | 2/2 |' in md
  assert '| tube | tube | 1 | 5.0 ± - | 4.0 ± - | 1/2 |' in md
  assert '| random | random | 1 | - | - | 0/2 |' in md
  assert '| tube | - | 5.0 / 4.0 |' in md


def test_run_config_sets_variant_seed_and_budget():
  base = pretrain.get_config('smoke')
  base.seed = 10
  base.lock()
  c = ablate.run_config(base, 'clusterstm_no_mrm', 2, 7)
  assert (c.mask.strategy, c.loss_weights.mrm, c.seed, c.total_steps) == ('clusterstm', 0.0, 12, 7)
  c = ablate.run_config(base, 'tube', 0, None)
  assert (c.mask.strategy, c.loss_weights.mrm, c.seed) == ('tube', base.loss_weights.mrm, 10)
  assert c.total_steps == base.total_steps
  assert base.mask.strategy == 'clusterstm'  # the base config is not modified
  with pytest.raises(UserError, match='unknown variant'):
    ablate.run_config(base, 'clusterstm_typo', 0, None)


def test_sweep_tables_resume_and_reuse(dirs):
  out = str(dirs['root'] / 'sweep')
  # Interrupted: the first run stops after one step (as a preempted job would), nothing complete.
  halted = ablate.run_sweep(base_config(dirs, halt_at_step=1), out, variants=VARIANTS,
                            num_seeds=2, steps=STEPS)
  assert not any(e['complete'] for e in halted['variants'].values())
  first = os.path.join(out, 'clusterstm', 'seed0')
  assert metric_steps(first) == [1]

  # The same command resumes: the partial run continues from its checkpoint (step 1 not redone).
  summary = ablate.run_sweep(base_config(dirs), out, variants=VARIANTS, num_seeds=2, steps=STEPS)
  assert metric_steps(first) == [1, 2]
  # Compiled programs are kept for the runs after the first of each variant.
  assert os.listdir(os.path.join(out, 'jax_cache'))

  # Every run in its own workdir, with its own seed and strategy, shared teacher.
  for v in VARIANTS:
    for s in (0, 1):
      with open(os.path.join(out, v, f'seed{s}', ablate.RUN_FILE)) as f:
        run = json.load(f)
      assert (run['seed'], run['mask.strategy'], run['total_steps']) == (s, v, STEPS)
      assert run['teacher.workdir'] == dirs['teacher']

  # JSON: per-seed values are the runs' own results, summarised with the sample std.
  with open(os.path.join(out, 'ablation.json')) as f:
    table = json.load(f)
  assert table == json.loads(json.dumps(summary))
  assert list(table['variants']) == VARIANTS
  assert table['setup']['steps'] == STEPS and table['setup']['seeds'] == [0, 1]
  for v in VARIANTS:
    e = table['variants'][v]
    assert e['complete'] and e['mask_strategy'] == v and sorted(e['per_seed']) == ['0', '1']
    for m in ('zeroshot_t2v_R@1', 'zeroshot_v2t_R@1'):
      values = []
      for s in (0, 1):
        with open(os.path.join(out, v, f'seed{s}', 'results.json')) as f:
          values.append(json.load(f)[m])
        assert e['per_seed'][str(s)][m] == values[-1]
      assert e[m]['values'] == values and e[m]['n'] == 2
      assert e[m]['mean'] == pytest.approx(np.mean(values))
      assert e[m]['std'] == pytest.approx(np.std(values, ddof=1))

  # Markdown: one row per variant with mean ± std of both directions.
  with open(os.path.join(out, 'ablation.md')) as f:
    md = f.read()
  for v in VARIANTS:
    e = table['variants'][v]
    t2v, v2t = e['zeroshot_t2v_R@1'], e['zeroshot_v2t_R@1']
    row = (f"| {v} | {v} | 1 | {t2v['mean']:.1f} ± {t2v['std']:.1f} | "
           f"{v2t['mean']:.1f} ± {v2t['std']:.1f} | 2/2 |")
    assert row in md, (row, md)

  # Re-run through the CLI: completed runs are reused, nothing trains, same table printed.
  counts = line_counts(out)
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.ablate', '--config=configs/pretrain.py:smoke',
       f'--out={out}', '--seeds=2', f'--steps={STEPS}', f'--variants={",".join(VARIANTS)}',
       f'--config.data.data_dir={dirs["data"]}', f'--config.teacher.workdir={dirs["teacher"]}',
       '--config.loss_weights.vtm=0', '--config.loss_weights.mlm=0'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert line_counts(out) == counts
  assert 'run already complete' not in r.stdout  # reused from results.json, not restored
  with open(os.path.join(out, 'ablation.json')) as f:
    again = json.load(f)
  assert again['variants'] == table['variants']
  t2v = table['variants']['clusterstm']['zeroshot_t2v_R@1']['mean']
  assert f'| clusterstm | clusterstm | 1 | {t2v:.1f} ± ' in r.stdout

  # Reusing the sweep with another budget is refused, naming the field.
  with pytest.raises(UserError, match='total_steps'):
    ablate.run_sweep(base_config(dirs), out, variants=VARIANTS, num_seeds=2, steps=STEPS + 1)


def test_cli_bad_variant_is_one_line_error(tmp_path):
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.ablate', '--config=configs/pretrain.py:smoke',
       f'--out={tmp_path}', '--variants=clusterstm,nope'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and 'nope' in r.stderr and 'Traceback' not in r.stderr
  assert not os.listdir(tmp_path)
