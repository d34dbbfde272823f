"""The `folder` dataset end to end: the README's "Your own videos" commands, run in order with
their paths moved into the test's directory, plus a corrupt video that the build must count.

shapes clips are written as mp4s by the tool, a corrupt mp4 is added to the test split, then
the smoke config pretrains on the folder, is exported, fine-tuned for retrieval and evaluated.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from clusterstm_jax.data.builders import real
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _readme_commands():
  with open(os.path.join(helpers.REPO, 'README.md')) as f:
    text = f.read()
  section = text[text.index('## Your own videos'):]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def _run(line, tmp_path, env):
  line = line.replace('my_videos', str(tmp_path / 'my_videos'))
  line = line.replace('workdirs/', f'{tmp_path}/workdirs/')
  r = subprocess.run(['bash', '-c', line], cwd=helpers.REPO, env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, (line, r.stderr[-3000:])
  return r.stdout


def test_readme_folder_commands_with_a_corrupt_video(tmp_path):
  commands = _readme_commands()
  assert len(commands) == 6
  data = tmp_path / 'data'
  env = dict(os.environ, CLUSTERSTM_DATA_DIR=str(data),  # `python` is this interpreter
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  out = _run(commands[0], tmp_path, env)
  assert 'wrote 320 clips' in out
  videos = tmp_path / 'my_videos'
  with open(videos / 'videos' / 'broken.mp4', 'wb') as f:
    f.write(np.random.default_rng(0).bytes(3000))
  with open(videos / 'annotations.csv', 'a') as f:
    f.write('videos/broken.mp4,a clip that cannot be decoded,test,,\n')

  for line in commands[1:]:
    out = _run(line, tmp_path, env)
  # The build: every listed clip kept but the corrupt one, which is counted.
  builder = real.get_builder('folder', str(data), 'default_f8_s64')
  report = builder.skipped()
  assert report['train'] == dict(total=256, kept=256, skipped=0, missing=0, unreadable=0,
                                 first=[])
  test = report['test']
  assert (test['total'], test['kept'], test['unreadable'], test['missing']) == (65, 64, 1, 0)
  assert test['first'][0]['video_id'] == 'test/videos/broken.mp4'
  assert os.path.isfile(os.path.join(builder.data_dir, 'tokenizer.model'))
  # Pretraining ran on it; the fine-tune's own evaluation is what `evaluate` prints.
  rows = helpers.metrics_rows(tmp_path / 'workdirs' / 'folder')
  assert max(r['step'] for r in rows) == 6
  with open(tmp_path / 'workdirs' / 'folder_ft' / 'results.json') as f:
    finetuned = json.load(f)
  assert finetuned['retrieval/num_videos'] == 64
  with open(tmp_path / 'workdirs' / 'folder_ft' / 'eval_retrieval.json') as f:
    evaluated = json.load(f)['metrics']
  for key, value in evaluated.items():
    assert finetuned[f'retrieval/{key}'] == pytest.approx(value, abs=1e-6), key
  assert 'contrastive scores only:' in out
