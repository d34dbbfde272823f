"""Command lines from any directory: --config=configs/x.py found in the installed `configs`
package when it is not there from here; a gs:// path without the [gcs] extra is one line."""
import os

import pytest

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from tests import helpers

pytestmark = pytest.mark.unit


def test_config_paths_resolve_from_another_directory(tmp_path, monkeypatch):
  here = config_lib.resolve_config_spec('configs/pretrain.py:smoke')
  assert here == 'configs/pretrain.py:smoke' or os.path.isfile(here.split(':')[0])
  monkeypatch.chdir(tmp_path)
  want = os.path.join(helpers.REPO, 'configs', 'pretrain.py')
  assert config_lib.resolve_config_spec('configs/pretrain.py:smoke') == want + ':smoke'
  assert config_lib.resolve_config_spec('configs/teacher.py') == want.replace('pretrain', 'teacher')
  assert config_lib.resolve_config_spec('configs/nope.py') == 'configs/nope.py'
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'pretrain.py').write_text('')  # a file here wins
  assert config_lib.resolve_config_spec('configs/pretrain.py') == 'configs/pretrain.py'
  assert cli.resolve_argv(['train', '--config', 'configs/eval_qa.py']) == [
      'train', '--config', os.path.join(helpers.REPO, 'configs', 'eval_qa.py')]
  assert config_lib.load_config_file('configs/teacher.py:smoke').task == 'siglip'


def test_gs_paths_without_the_gcs_extra_are_one_line(monkeypatch, capsys):
  argv = ['train', '--config=configs/pretrain.py', '--workdir=gs://bucket/run']
  # With every module present (json and os stand in: the suite does not install the [gcs] extra),
  # a gs:// argument passes through unchanged.
  monkeypatch.setattr(cli, 'GCS_MODULES', ('json', 'os.path'))
  assert cli.gcs_missing() == []
  assert cli.resolve_argv(argv)[2] == argv[2]
  monkeypatch.setattr(cli, 'GCS_MODULES', ('gcsfs_not_installed', 'google.cloud.nothing'))
  with pytest.raises(SystemExit) as e:
    cli.resolve_argv(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install 'clusterstm_jax[gcs]'" in err[0]
  assert 'gcsfs_not_installed, google.cloud.nothing missing' in err[0]
