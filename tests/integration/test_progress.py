"""Evaluation during training, plain progress lines and the saved config, through the train
command with its output captured (stdout is not a terminal, as in a TPU VM's log file)."""
import io
import json
import os

import pytest

import clusterstm_jax
from clusterstm_jax import progress
from tests import helpers

pytestmark = pytest.mark.integration


def test_plain_lines_periodic_eval_and_saved_config(tmp_path):
  workdir = tmp_path / 'run'
  r = helpers.run_python(
      '-m', 'clusterstm_jax.train', f'--config=configs/pretrain.py:{helpers.TEACHERLESS}',
      '--config.loss_weights.mrm=0', f'--config.data.data_dir={tmp_path / "data"}',
      '--config.eval_every_steps=3', '--config.async_checkpointing=False',
      f'--workdir={workdir}', timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert '\r' not in out
  lines = [l for l in out.splitlines() if l.startswith('step ')]
  assert [l.split()[1] for l in lines] == [f'{s}/6' for s in range(1, 7)]  # log_every_steps 1
  assert all(' examples/s ' in l and ' ETA ' in l and ' loss ' in l for l in lines)
  assert out.count('Evaluation at step 3:') == 1 and 'Evaluation at step 6' not in out
  assert 'Zero-shot text-video retrieval on the test split:' in out  # the final one
  rows = helpers.metrics_rows(workdir)
  evals = {row['step']: row for row in rows if 'eval/zeroshot_t2v_R@1' in row}
  assert sorted(evals) == [3, 6]
  # The config: printed first, saved whole, and the workdir still loads as a training run.
  assert out.index('config (') < out.index(lines[0])
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved['eval_every_steps'] == 3 and saved['task'] == 'clusterstm'
  assert not os.path.exists(workdir / 'config.json.tmp')
  model = clusterstm_jax.load(str(workdir))
  assert model.config.eval_every_steps == 3


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  plain, tty = io.StringIO(), Terminal()
  for stream in (plain, tty):
    p = progress.Progress(4, 0, stream=stream)
    for step in range(1, 5):
      p.update(1)
      p.log(step, 1.0 / step, 100.0)
    p.write('a table')
    p.close()
  assert plain.getvalue().splitlines()[0].startswith('step 1/4  loss 1.0000  100.0 examples/s')
  assert '\r' not in plain.getvalue() and 'a table' in plain.getvalue()
  assert '\r' in tty.getvalue() and 'step 1/4' not in tty.getvalue()
  silent = io.StringIO()
  p = progress.Progress(4, 0, stream=silent, enabled=False)
  p.log(1, 1.0, 1.0)
  assert silent.getvalue() == ''
