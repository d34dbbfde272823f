"""What a run survives (README "Reliability"), on the teacherless smoke model: SIGTERM/SIGINT save
the current step and exit 75, then resume exactly; a corrupt latest checkpoint of each kind falls
back to the previous one with a warning; a NaN run never saves a non-finite checkpoint; resumed
runs never repeat metric rows; the workdir lock; exports that refuse foreign directories and are
checked on load; a changed model is an error, not a corrupt checkpoint."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clusterstm_jax import exports
from clusterstm_jax import loading
from clusterstm_jax import loop
from clusterstm_jax import resilience
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.errors import EXIT_PREEMPTED, UserError
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 40
RUN = {'total_steps': STEPS, 'checkpoint_every_steps': 2, 'log_every_steps': 1,
       'keep_checkpoints': 3}


def config(data_dir, **overrides):
  return helpers.teacherless_config(**{'data.data_dir': data_dir, **RUN, **overrides})


def rows(workdir):
  """metrics.jsonl rows, asserting no step is there twice (train rows; eval rows apart)."""
  train = [r['step'] for r in helpers.metrics_rows(workdir) if 'loss' in r]
  assert len(train) == len(set(train)), sorted(train)
  return helpers.losses(workdir)


@pytest.fixture(scope='module')
def straight(shared_smoke, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  results = loop.run(config(shared_smoke.data_dir), workdir)
  return workdir, results


@pytest.fixture(scope='module')
def halted(shared_smoke, tmp_path_factory):
  """A run halted at step 6: checkpoints 2, 4, 6."""
  workdir = str(tmp_path_factory.mktemp('halted'))
  assert loop.run(config(shared_smoke.data_dir, halt_at_step=6), workdir)['step'] == 6
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
  return workdir


def _start_train(data_dir, workdir):
  """The teacherless smoke run of `config` as a `python -m clusterstm_jax.train` process."""
  args = ['-m', 'clusterstm_jax.train', '--config=configs/pretrain.py:smoke,mask=random',
          '--config.loss_weights.mrm=0', f'--config.data.data_dir={data_dir}',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in RUN.items()]
  return subprocess.Popen([sys.executable, *args], cwd=helpers.REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['TERM', 'INT'])
def test_signal_saves_the_current_step_then_exact_resume(shared_smoke, straight, tmp_path,
                                                         signum):
  workdir = tmp_path / 'w'
  proc = _start_train(shared_smoke.data_dir, workdir)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert 'Traceback' not in stderr and 'stopped:' in stderr
  logged = sorted(rows(str(workdir)))
  stop = logged[-1]
  assert 3 <= stop < STEPS
  assert stop in [int(s) for s in os.listdir(workdir / 'checkpoints')]  # zero steps lost
  assert not (workdir / 'run.lock').exists()

  loop.run(config(shared_smoke.data_dir), str(workdir))
  a, b = rows(straight[0]), rows(str(workdir))
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_signal_during_the_imports_stops_at_the_first_step_after_saving(shared_smoke, tmp_path):
  workdir = tmp_path / 'w'
  proc = _start_train(shared_smoke.data_dir, workdir)
  time.sleep(1.5)  # importing jax, flax, grain...: seconds; the package itself: milliseconds
  assert not (workdir / 'config.json').exists()  # still starting
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert 'SIGINT received while starting' in stderr and 'Traceback' not in stderr
  assert sorted(rows(str(workdir))) == [1]
  assert os.listdir(workdir / 'checkpoints') == ['1']


def _biggest(pattern):
  return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


CORRUPTIONS = {
    'truncated_array_file': lambda d: os.truncate(_biggest(f'{d}/6/state/**/d/*'), 100),
    'missing_manifest_ocdbt': lambda d: os.remove(f'{d}/6/state/manifest.ocdbt'),
    'garbage_state_metadata': lambda d: open(f'{d}/6/state/_METADATA', 'w').write('{garbage'),
    'garbage_data_json': lambda d: [open(p, 'w').write('garbage')
                                    for p in glob.glob(f'{d}/6/data/*.json')],
    'removed_state_item': lambda d: shutil.rmtree(f'{d}/6/state'),
    'removed_data_item': lambda d: shutil.rmtree(f'{d}/6/data'),
}


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(shared_smoke, straight, halted,
                                                              tmp_path, capsys, kind):
  workdir = str(tmp_path / 'w')
  shutil.copytree(halted, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  CORRUPTIONS[kind](ckpts)
  assert loop.run(config(shared_smoke.data_dir, halt_at_step=6), workdir)['step'] == 6
  err = capsys.readouterr().err
  assert f'checkpoint step 6 in {os.path.abspath(ckpts)} does not restore' in err, err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_unreadable', '6'))  # kept, not deleted
  assert sorted(os.listdir(ckpts)) == ['2', '4', '6']  # 4 restored, 5 and 6 replayed and saved
  a, b = rows(straight[0]), rows(workdir)
  assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in b)


def test_stray_empty_step_directory_is_moved_aside(shared_smoke, halted, tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  shutil.copytree(halted, workdir)
  os.mkdir(os.path.join(workdir, 'checkpoints', '8'))
  assert loop.run(config(shared_smoke.data_dir, halt_at_step=6), workdir)['step'] == 6
  assert 'checkpoint step 8' in capsys.readouterr().err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_unreadable', '8'))


def test_resume_from_another_run_skips_its_unreadable_steps(shared_smoke, straight, halted,
                                                              tmp_path, capsys):
  """config.resume = a run's checkpoint dir: its newest step that restores, the others named
  and left in place (not this run's files); a given step that does not restore is an error."""
  source = str(tmp_path / 'source')
  shutil.copytree(halted, source)
  ckpts = os.path.join(source, 'checkpoints')
  CORRUPTIONS['truncated_array_file'](ckpts)
  before = sorted(os.listdir(source))
  workdir = str(tmp_path / 'w')
  assert loop.run(config(shared_smoke.data_dir, halt_at_step=6, resume=ckpts), workdir)['step'] == 6
  assert f'resume={ckpts}: checkpoint step 6 does not restore' in capsys.readouterr().err
  assert sorted(os.listdir(source)) == before and sorted(os.listdir(ckpts)) == ['2', '4', '6']
  a, b = rows(straight[0]), rows(workdir)
  assert sorted(b) == [5, 6] and all(a[s] == b[s] for s in b)  # from step 4: 5 and 6 replayed
  with pytest.raises(UserError, match=r'checkpoint step 6 does not restore \(') as e:
    loop.run(config(shared_smoke.data_dir, resume=os.path.join(ckpts, '6')), str(tmp_path / 'x'))
  assert '\n' not in str(e.value)


def test_keep_period_keeps_sparse_old_checkpoints(shared_smoke, straight, tmp_path):
  workdir = str(tmp_path / 'w')
  cfg = config(shared_smoke.data_dir, halt_at_step=12, keep_checkpoints=2, keep_period=4)
  assert loop.run(cfg, workdir)['step'] == 12
  # every 2 steps saved; the 2 newest kept, and every multiple of 4 kept out of rotation
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [4, 8, 10, 12]


def test_changed_model_is_an_error_not_a_corrupt_checkpoint(shared_smoke, halted, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(halted, workdir)
  with pytest.raises(UserError, match='holds another model'):
    loop.run(config(shared_smoke.data_dir, **{'model.embed_dim': 16}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


def test_nan_run_never_saves_a_non_finite_checkpoint(shared_smoke, tmp_path):
  workdir = str(tmp_path / 'w')
  cfg = config(shared_smoke.data_dir, total_steps=12, log_every_steps=10,
               checkpoint_every_steps=1, **{'optax.lr': 1e30})
  with pytest.raises(UserError, match='non-finite') as first:
    loop.run(cfg, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  saved = sorted(int(s) for s in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
  mesh = sharding_lib.make_mesh(cfg.mesh)
  for step in saved:
    params = loading.restore_params(cfg, ckpt_dir, step, mesh, helpers.SHAPES_VOCAB)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
  with pytest.raises(UserError, match='non-finite') as again:  # the rerun fails the same way
    loop.run(cfg, workdir)
  assert str(again.value) == str(first.value)
  if saved:
    assert sorted(int(s) for s in os.listdir(ckpt_dir)) == saved


def test_rerun_after_a_stop_during_final_eval_keeps_final_train_loss(shared_smoke, straight,
                                                                     tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(straight[0], workdir)
  os.remove(os.path.join(workdir, 'results.json'))  # as if killed during the final evaluation
  results = loop.run(config(shared_smoke.data_dir), workdir)
  assert results['final_train_loss'] == straight[1]['final_train_loss']
  assert results == straight[1]
  evals = [r for r in helpers.metrics_rows(workdir) if any(k.startswith('eval/') for k in r)]
  assert len(evals) == 1 and rows(workdir) == rows(straight[0])


def test_finished_run_whose_last_checkpoint_breaks_evaluates_again(shared_smoke, straight,
                                                                  tmp_path):
  """The final checkpoint unreadable: the rerun replays from the one before, and a stop during
  the replay leaves no stale results.json that would skip the final evaluation's row."""
  workdir = str(tmp_path / 'w')
  shutil.copytree(straight[0], workdir)
  os.truncate(_biggest(f'{workdir}/checkpoints/{STEPS}/state/**/d/*'), 100)
  assert loop.run(config(shared_smoke.data_dir, halt_at_step=STEPS - 1), workdir)['halted']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  assert loop.run(config(shared_smoke.data_dir), workdir) == straight[1]
  evals = [r for r in helpers.metrics_rows(workdir) if any(k.startswith('eval/') for k in r)]
  assert len(evals) == 1 and rows(workdir) == rows(straight[0])


def test_workdir_lock(shared_smoke, tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from clusterstm_jax import resilience; '
       f'resilience.WorkdirLock({workdir!r}).__enter__(); print("locked", flush=True); '
       'time.sleep(300)'], cwd=helpers.REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UserError, match=f'in use by another run \\(pid {holder.pid}'):
      loop.run(config(shared_smoke.data_dir), workdir)
  finally:
    holder.kill()
    holder.wait()
  with resilience.WorkdirLock(workdir):  # the killed holder's lock is stale: taken over
    assert json.load(open(os.path.join(workdir, 'run.lock')))['pid'] == os.getpid()
  assert 'stale lock' in capsys.readouterr().out
  assert not os.path.exists(os.path.join(workdir, 'run.lock'))


def test_export_refuses_foreign_dirs_and_is_checked_on_load(straight, tmp_path):
  workdir = straight[0]
  out = str(tmp_path / 'export')
  loading.export_run(workdir, out)
  with pytest.raises(UserError, match='--overwrite'):
    loading.export_run(workdir, out)
  loading.export_run(workdir, out, overwrite=True)
  exports.read_config(out)  # verifies
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('keep me')
  for target in (str(foreign), workdir):
    with pytest.raises(UserError, match='not an export'):
      loading.export_run(workdir, target, overwrite=True)
  assert (foreign / 'notes.txt').read_text() == 'keep me'
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  r = helpers.run_python('-m', 'clusterstm_jax.export', f'--workdir={workdir}',
                         f'--out={foreign}', timeout=120)
  assert r.returncode == 1 and [l for l in r.stderr.splitlines()
                                if l.startswith('error:')] == [l for l in r.stderr.splitlines()
                                                               if 'not an export' in l]

  def tampered(edit):
    copy = str(tmp_path / f'copy{len(os.listdir(tmp_path))}')
    shutil.copytree(out, copy)
    edit(copy)
    return copy
  cfg = json.load(open(os.path.join(out, 'config.json')))
  cfg['data']['num_frames'] = 8  # same parameter shapes, silently wrong before
  cases = {
      'config.json was changed': lambda d: open(f'{d}/config.json', 'w').write(json.dumps(cfg)),
      'config.json was changed ': lambda d: open(f'{d}/config.json', 'w').write('garbage'),
      'was changed or truncated': lambda d: os.truncate(_biggest(f'{d}/params/**/d/*'), 10),
      'manifest.ocdbt is missing': lambda d: os.remove(f'{d}/params/manifest.ocdbt'),
      'tokenizer.model was changed': lambda d: os.truncate(f'{d}/tokenizer.model', 10),
      'manifest.json is damaged': lambda d: open(f'{d}/manifest.json', 'w').write('{'),
  }
  for words, edit in cases.items():
    with pytest.raises(UserError, match=words.strip()):
      exports.read_config(tampered(edit))


def test_chaos_short(tmp_path):
  """tools/chaos.py in brief: a kill -9, a SIGTERM, a SIGINT and a corrupt latest checkpoint,
  then the final rows and table are bitwise those of an uninterrupted run (it exits 1 if not)."""
  r = helpers.run_python(
      '-m', 'clusterstm_jax.tools.chaos', f'--out={tmp_path / "chaos"}', '--faults=4',
      '--seed=1', '--train_args=--config=configs/pretrain.py:smoke,mask=random '
      '--config.loss_weights.mrm=0 --config.total_steps=12 --config.checkpoint_every_steps=3 '
      '--config.log_every_steps=1', timeout=1500)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert 'duplicates: none; rows bitwise equal: True; final table equal: True' in r.stdout
  table = r.stdout[r.stdout.index('| # | fault'):]
  lines = [l for l in table.splitlines() if l.startswith('| ') and l[2].isdigit()]
  assert [l.split(' | ')[1] for l in lines] == ['kill -9', 'SIGTERM', 'SIGINT',
                                                'truncated array file']
