"""tools/ablate: the statistics (bootstrap intervals, pairing, pooling) and the resumable sweep's
bookkeeping, with fake training runs (the real short path is in tests/integration/test_tools.py)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import pretrain
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.errors import UserError
from clusterstm_jax.tools import ablate
from clusterstm_jax.tools import ablate_stats as stats

pytestmark = pytest.mark.unit


def test_bootstrap_ci_of_two_seeds_one_query_spans_them():
  # Resampling 2 seeds gives a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4: the 2.5% and
  # 97.5% quantiles are a and b.
  mean, low, high = stats.bootstrap_ci([[1.0], [3.0]])
  assert (mean, low, high) == (2.0, 1.0, 3.0)


def test_bootstrap_ci_constant_difference_is_a_point():
  assert stats.bootstrap_ci(np.full((3, 50), 2.5)) == (2.5, 2.5, 2.5)


def test_bootstrap_ci_matches_the_normal_interval_of_a_large_sample():
  rng = np.random.default_rng(1)
  diff = rng.normal(1.0, 4.0, size=(1, 4000))  # one seed: only the queries vary
  mean, low, high = stats.bootstrap_ci(diff)
  half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
  assert abs((high - low) / 2 - half) < 0.05 * half
  assert abs((low + high) / 2 - mean) < 0.1 * half


def test_bootstrap_ci_is_reproducible_and_seed_spread_widens_it():
  rng = np.random.default_rng(2)
  noise = rng.normal(0, 1, size=(4, 300))
  assert stats.bootstrap_ci(noise) == stats.bootstrap_ci(noise)
  spread = noise + np.array([[-3.0], [-1.0], [1.0], [3.0]])  # seeds disagree
  assert np.ptp(stats.bootstrap_ci(spread)[1:]) > 3 * np.ptp(stats.bootstrap_ci(noise)[1:])
  with pytest.raises(ValueError):
    stats.bootstrap_ci(np.zeros((0, 3)))


def _evaluation(t2v_val, t2v_test):
  return {'val': {'t2v': t2v_val, 'v2t': [1] * len(t2v_val)},
          'test': {'t2v': t2v_test, 'v2t': [2] * len(t2v_test)}}


def test_pooled_recall_counts_val_and_test_queries_together():
  ev = _evaluation([1, 2, 1, 5], [1, 1])
  assert stats.recall(stats.pooled_ranks(ev, 't2v')) == pytest.approx(400 / 6)
  assert stats.recall(stats.pooled_ranks(ev, 't2v'), k=2) == pytest.approx(500 / 6)
  assert stats.recall(stats.pooled_ranks(ev, 'v2t')) == pytest.approx(400 / 6)


def test_paired_difference_pairs_seeds_and_queries():
  ref = {0: {'after': _evaluation([1, 2], [1, 2])}, 1: {'after': _evaluation([2, 2], [2, 2])}}
  var = {0: {'after': _evaluation([1, 1], [1, 2])},  # one more hit at seed 0
         1: {'after': _evaluation([2, 2], [2, 2])},
         2: {'after': _evaluation([1, 1], [1, 1])}}  # no reference run for seed 2: left out
  d = stats.paired_difference({'v': var, 'r': ref}, 'v', 'r', 'after', 't2v')
  assert d['seeds'] == [0, 1] and d['per_seed'] == [25.0, 0.0] and d['positive'] == 1
  assert d['mean'] == 12.5 and d['low'] <= 12.5 <= d['high']
  assert stats.paired_difference({'v': var, 'r': ref}, 'v', 'r', 'before', 't2v') is None


def test_run_configs_of_one_seed_differ_only_in_the_variant():
  base = pretrain.get_config('smoke')
  configs = {v: ablate.run_config(base, v, 1, 5, 2, 'tiny_distractors', '/t/tiny_distractors')
             for v in ablate.VARIANTS}
  ref = ablate.fingerprint(configs['clusterstm'])
  assert ref['seed'] == base.seed + 1 and ref['total_steps'] == 7
  assert ref['unmasked_steps'] == 2 and ref['data.builder_config'] == 'tiny_distractors'
  for v, c in configs.items():
    fp = ablate.fingerprint(c)
    assert {k for k in ref if fp[k] != ref[k]} <= {'mask.strategy', 'loss_weights.mrm'}, v
    assert c.teacher.workdir == '/t/tiny_distractors'
    assert c.keep_period == 5  # the masked steps' last checkpoint stays for a re-tuning


class FakeTraining:
  """Stands in for loop.run and query_ranks: a 'checkpoint' is a step number in a file."""

  def __init__(self, monkeypatch, fail_at=None):
    self.calls, self.fail_at = [], fail_at
    monkeypatch.setattr(ablate.loop, 'run', self.run)
    monkeypatch.setattr(ablate, 'query_ranks', self.ranks)

  def _event(self, what):
    self.calls.append(what)
    if what == self.fail_at:
      raise KeyboardInterrupt(what)

  def run(self, config, workdir):
    path = os.path.join(workdir, 'step')
    step = int(open(path).read()) if os.path.exists(path) else 0
    stop = config.total_steps if config.halt_at_step < 0 else config.halt_at_step
    self._event(('train', workdir, step, stop))
    with open(path, 'w') as f:
      f.write(str(stop))
    return {'step': stop, 'halted': True} if stop < config.total_steps else {'step': stop}

  def ranks(self, config, workdir, step):
    self._event(('eval', workdir, step))
    good = config.mask.strategy.startswith('clusterstm') + (step == config.total_steps)
    return {'val': {'t2v': [1] * good + [3] * (4 - good), 'v2t': [1, 2, 3, 4]},
            'test': {'t2v': [1, 2, 3, 4], 'v2t': [1] * good + [2] * (4 - good)}}


def _sweep(out, **kw):
  return ablate.run_sweep(pretrain.get_config('smoke'), str(out),
                          variants=['clusterstm', 'random'], num_seeds=2, steps=3, tune_steps=1,
                          datasets=['tiny', 'tiny_distractors'], compile_cache=False, **kw)


def test_sweep_runs_stages_in_order_and_writes_the_tables(tmp_path, monkeypatch):
  fake = FakeTraining(monkeypatch)
  summary = _sweep(tmp_path)
  wd = str(tmp_path / 'tiny' / 'clusterstm' / 'seed0')
  assert fake.calls[:4] == [('train', wd, 0, 3), ('eval', wd, 3), ('train', wd, 3, 4),
                            ('eval', wd, 4)]
  assert len(fake.calls) == 2 * 2 * 2 * 4  # seeds x datasets x variants x 4
  order = [c[1] for c in fake.calls[::4]]
  assert order[:4] == [str(tmp_path / d / v / 'seed0') for d in ('tiny', 'tiny_distractors')
                       for v in ('clusterstm', 'random')]  # seed-major
  diff = summary['datasets']['tiny']['random']['diff']
  assert diff['before/t2v']['mean'] == -12.5 and diff['after/t2v']['mean'] == -12.5
  md = (tmp_path / 'ablation.md').read_text()
  assert '## tiny_distractors' in md and '-12.5 [' in md
  assert json.loads((tmp_path / 'ablation.json').read_text())['setup']['splits'] == ['val', 'test']


def test_killed_sweep_resumes_without_rerunning_finished_work(tmp_path, monkeypatch):
  wd = str(tmp_path / 'tiny' / 'random' / 'seed0')
  FakeTraining(monkeypatch, fail_at=('train', wd, 3, 4))  # killed in the 2nd run's tuning
  with pytest.raises(KeyboardInterrupt):
    _sweep(tmp_path)
  assert os.path.exists(os.path.join(wd, 'before.json'))
  assert not os.path.exists(os.path.join(wd, 'after.json'))
  fake = FakeTraining(monkeypatch)
  _sweep(tmp_path)
  # The finished run is reused untouched; the killed one skips its stage 1 and 'before' eval.
  assert fake.calls[:2] == [('train', wd, 3, 4), ('eval', wd, 4)]
  assert len(fake.calls) == 2 + 6 * 4
  again = FakeTraining(monkeypatch)
  _sweep(tmp_path)
  assert again.calls == []


def test_sweep_refuses_other_settings_in_the_same_out(tmp_path, monkeypatch):
  FakeTraining(monkeypatch)
  _sweep(tmp_path)
  with pytest.raises(UserError, match='other settings'):
    ablate.run_sweep(pretrain.get_config('smoke'), str(tmp_path), variants=['clusterstm'],
                     num_seeds=1, steps=4, tune_steps=1, datasets=['tiny'],
                     compile_cache=False)


@pytest.mark.parametrize('kw, match', [
    (dict(variants=['random']), 'must include clusterstm'),
    (dict(datasets=['nope']), 'no builder config'),
    (dict(tune_steps=0), 'at least 1'),
])
def test_sweep_rejects_bad_arguments_before_training(tmp_path, kw, match):
  args = dict(variants=['clusterstm'], num_seeds=1, steps=2, tune_steps=1, datasets=['tiny'],
              compile_cache=False)
  args.update(kw)
  with pytest.raises(UserError, match=match):
    ablate.run_sweep(pretrain.get_config('smoke'), str(tmp_path / 'out'), **args)
  assert not (tmp_path / 'out').exists()


def test_variants_of_one_seed_start_from_the_same_parameters():
  def init(variant, seed_offset):
    config = ablate.run_config(pretrain.get_config('smoke'), variant, seed_offset, 2, 1, 'tiny')
    task = tasks_lib.get(config, tasks_lib.TextSpec(256))
    key = jax.random.key(config.seed)  # what loop.run's init_state gets
    return jax.jit(lambda k: task.model.init({'params': k, 'dropout': k},
                                             *task.init_inputs)['params'])(key)

  ref = jax.tree.leaves(init('clusterstm', 0))
  for variant in ('clusterstm_no_mrm', 'random'):
    other = jax.tree.leaves(init(variant, 0))
    assert len(other) == len(ref)
    assert all(np.array_equal(a, b) for a, b in zip(ref, other)), variant
  assert not all(np.array_equal(a, b) for a, b in zip(ref, jax.tree.leaves(init('clusterstm', 1))))


def test_tables_only_tabulates_copied_finished_runs_and_trains_nothing(tmp_path, monkeypatch,
                                                                      capsys):
  """The three JSON files of each finished run, copied into a new directory, give the same
  tables without training; unfinished runs are counted and left out; other settings refused."""
  FakeTraining(monkeypatch)
  full = _sweep(tmp_path / 'sweep')
  copy = tmp_path / 'copy'
  for path in (tmp_path / 'sweep').rglob('*.json'):
    rel = path.relative_to(tmp_path / 'sweep')
    if path.name in (ablate.RUN_FILE, 'before.json', 'after.json') and 'seed1' not in str(rel):
      (copy / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(path, copy / rel)
  fake = FakeTraining(monkeypatch)
  capsys.readouterr()
  summary = _sweep(copy, tables_only=True)
  assert fake.calls == []
  assert '4 of 8 runs not finished' in capsys.readouterr().out
  assert not (copy / 'jax_cache').exists()
  for d in ('tiny', 'tiny_distractors'):
    got = summary['datasets'][d]['random']
    assert got['seeds_done'] == [0]
    assert got['r1']['after/t2v']['per_seed'] == {
        '0': full['datasets'][d]['random']['r1']['after/t2v']['per_seed']['0']}
  assert '## tiny_distractors' in (copy / 'ablation.md').read_text()
  with pytest.raises(UserError, match='other settings'):
    ablate.run_sweep(pretrain.get_config('smoke'), str(copy), variants=['clusterstm'],
                     num_seeds=1, steps=4, tune_steps=1, datasets=['tiny'],
                     compile_cache=False, tables_only=True)
  with pytest.raises(UserError, match='does not exist'):
    _sweep(tmp_path / 'nope', tables_only=True)
