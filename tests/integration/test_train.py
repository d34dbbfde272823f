"""Behavioural tests of the training entry point on the tiny shapes config."""
import os

import pytest

from clusterstm_jax import loop
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope='module')
def straight_run(shared_smoke, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, loop.run(shared_smoke.config(), workdir)


def test_smoke_run_trains_checkpoints_and_evaluates(shared_smoke, straight_run):
  workdir, results = straight_run
  assert results['step'] == 6
  for key in ('zeroshot_t2v_R@1', 'zeroshot_v2t_R@1', 'zeroshot_t2v_MdR'):
    assert key in results
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert sorted(helpers.losses(workdir)) == list(range(1, 7))
  assert os.listdir(os.path.join(workdir, 'tb'))
  # Same command again: reports completion instead of starting over.
  again = loop.run(shared_smoke.config(), workdir)
  assert again['step'] == 6
  assert sorted(helpers.losses(workdir)) == list(range(1, 7))


def test_exact_resume(shared_smoke, straight_run, tmp_path):
  straight, _ = straight_run
  split = str(tmp_path / 'split')
  halted = loop.run(shared_smoke.config(halt_at_step=3), split)
  assert halted == {'step': 3, 'halted': True}
  loop.run(shared_smoke.config(), split)
  a, b = helpers.losses(straight), helpers.losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (s, a[s], b[s])


def test_exact_resume_with_worker_processes(shared_smoke, straight_run, tmp_path):
  """Decoding in a grain worker process, 2 batches prefetched onto the mesh, halted and resumed:
  the same losses as the straight in-process run (same batches, same resume position)."""
  straight, _ = straight_run
  split = str(tmp_path / 'split')
  workers = {'data.worker_count': 1, 'data.prefetch': 2}
  assert loop.run(shared_smoke.config(halt_at_step=3, **workers), split)['halted']
  loop.run(shared_smoke.config(**workers), split)
  a, b = helpers.losses(straight), helpers.losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (s, a[s], b[s])


def test_bfloat16_policy_trains_like_float32(shared_smoke, straight_run, tmp_path):
  """bf16 activations and matmuls (f32 params, optimizer, losses) with every block
  rematerialised: the smoke run's losses stay within 2% of the f32 run's at every step."""
  straight, _ = straight_run
  bf16 = str(tmp_path / 'bf16')
  results = loop.run(shared_smoke.config(dtype='bfloat16', remat='full'), bf16)
  a, b = helpers.losses(straight), helpers.losses(bf16)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=0.02), (s, a[s], b[s])
  assert results['step'] == 6 and 'zeroshot_t2v_R@1' in results


def _cli(*args):
  return helpers.run_python('-m', 'clusterstm_jax.train', *args)


def test_cli_bad_inputs_give_one_line_errors(shared_smoke, tmp_path):
  data_dir, teacher = shared_smoke
  base = ['--config=configs/pretrain.py:smoke', f'--workdir={tmp_path / "w"}',
          f'--config.data.data_dir={data_dir}', f'--config.teacher.workdir={teacher}']
  r = _cli(*base, '--config.not_a_field=3')
  assert r.returncode != 0 and 'not_a_field' in r.stderr and 'Traceback' not in r.stderr
  r = _cli(*base, '--config.batch_size=abc')
  assert r.returncode != 0 and 'batch_size' in r.stderr and 'Traceback' not in r.stderr
  r = _cli(*base, f'--config.resume={tmp_path / "missing"}')
  assert r.returncode == 1 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
  r = _cli('--config=configs/pretrain.py:smok', f'--workdir={tmp_path / "w2"}')
  assert r.returncode != 0 and 'smok' in r.stderr and 'Traceback' not in r.stderr
