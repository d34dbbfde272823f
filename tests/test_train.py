"""Behavioural tests of the training entry point on the tiny shapes config."""
import json
import os
import subprocess
import sys

import pytest

from configs import pretrain
from clusterstm_jax import config_lib
from clusterstm_jax import train

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(shared_smoke):
  # The session's tiny dataset and smoke teacher (conftest.py): the teacher trains on first use.
  data, teacher = shared_smoke
  TEACHER_DIRS[data] = teacher
  return data


TEACHER_DIRS = {}


def smoke_config(data_dir, **overrides):
  config = pretrain.get_config('smoke')
  config.data.data_dir = data_dir
  config.teacher.workdir = TEACHER_DIRS[data_dir]
  config.async_checkpointing = False
  return config_lib.with_overrides(config, **overrides)


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, train.train_and_evaluate(smoke_config(data_dir), workdir)


def test_smoke_run_trains_checkpoints_and_evaluates(data_dir, straight_run):
  workdir, results = straight_run
  assert results['step'] == 6
  for key in ('zeroshot_t2v_R@1', 'zeroshot_v2t_R@1', 'zeroshot_t2v_MdR'):
    assert key in results
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert sorted(losses(workdir)) == list(range(1, 7))
  assert os.listdir(os.path.join(workdir, 'tb'))
  # Same command again: reports completion instead of starting over.
  again = train.train_and_evaluate(smoke_config(data_dir), workdir)
  assert again['step'] == 6
  assert sorted(losses(workdir)) == list(range(1, 7))


def test_exact_resume(data_dir, straight_run, tmp_path):
  straight, _ = straight_run
  split = str(tmp_path / 'split')
  halted = train.train_and_evaluate(smoke_config(data_dir, halt_at_step=3), split)
  assert halted == {'step': 3, 'halted': True}
  train.train_and_evaluate(smoke_config(data_dir), split)
  a, b = losses(straight), losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (s, a[s], b[s])


def _cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, '-m', 'clusterstm_jax.train', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs_give_one_line_errors(data_dir, tmp_path):
  base = ['--config=configs/pretrain.py:smoke', f'--workdir={tmp_path / "w"}',
          f'--config.data.data_dir={data_dir}',
          f'--config.teacher.workdir={TEACHER_DIRS[data_dir]}']
  r = _cli(*base, '--config.not_a_field=3')
  assert r.returncode != 0 and 'not_a_field' in r.stderr and 'Traceback' not in r.stderr
  r = _cli(*base, '--config.batch_size=abc')
  assert r.returncode != 0 and 'batch_size' in r.stderr and 'Traceback' not in r.stderr
  r = _cli(*base, f'--config.resume={tmp_path / "missing"}')
  assert r.returncode == 1 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
  r = _cli('--config=configs/pretrain.py:smok', f'--workdir={tmp_path / "w2"}')
  assert r.returncode != 0 and 'smok' in r.stderr and 'Traceback' not in r.stderr
