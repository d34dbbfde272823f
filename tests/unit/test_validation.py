"""Bad inputs are one `error:` line naming the field or path, found before anything is created
(no workdir, no dataset, no compile): loop.run in-process for the config and path checks, the
train command in a subprocess for what only the command line sees."""
import os

import pytest

from clusterstm_jax import loop
from clusterstm_jax.errors import UserError
from tests import helpers

pytestmark = pytest.mark.unit

# (case id, overrides of the teacherless smoke config, words the error must contain)
BAD_CONFIGS = [
    ('keep_checkpoints=-1', {'keep_checkpoints': -1}, 'keep_checkpoints=-1'),
    ('keep_checkpoints=0', {'keep_checkpoints': 0}, 'keep_checkpoints=0'),
    ('checkpoint_every_steps=0', {'checkpoint_every_steps': 0}, 'checkpoint_every_steps=0'),
    ('log_every_steps=0', {'log_every_steps': 0}, 'log_every_steps=0'),
    ('total_steps=-5', {'total_steps': -5}, 'total_steps=-5'),
    ('total_steps=0', {'total_steps': 0}, 'total_steps=0'),
    ('warmup_steps=-3', {'warmup_steps': -3}, 'warmup_steps=-3'),
    ('num_frames=0', {'data.num_frames': 0}, 'data.num_frames=0'),
    ('keep_period=-1', {'keep_period': -1}, 'keep_period=-1'),
    ('mesh_too_big', {'mesh': (('data', 16), ('fsdp', 1), ('tensor', 1))}, 'needs 16 devices'),
    ('sharding_rules', {'sharding_rules': 'nope'}, "unknown sharding_rules 'nope'"),
    ('real_data_dir_missing', {'data.name': 'msrvtt', 'data.data_dir': '/nonexistent/data',
                               'data.tokenizer': ''}, 'data_dir=/nonexistent/data'),
    ('empty_data_dir', {'data.data_dir': ''}, 'data_dir is empty'),
    ('missing_resume', {'resume': '/nonexistent/ckpt'}, '/nonexistent/ckpt'),
]


@pytest.mark.parametrize('overrides,words', [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_error_and_creates_nothing(tmp_path, overrides, words):
  config = helpers.teacherless_config(**{'data.data_dir': str(tmp_path / 'data'), **overrides})
  workdir = tmp_path / 'run' / 'w'
  with pytest.raises(UserError) as e:
    loop.run(config, str(workdir))
  assert words in str(e.value) and '\n' not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == []  # no workdir, no data dir


def test_bad_paths_are_one_error_and_create_nothing(tmp_path):
  config = helpers.teacherless_config(**{'data.data_dir': str(tmp_path / 'data')})
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  for workdir, words in ((a_file, 'is a file'), (a_file / 'sub', 'is a file')):
    with pytest.raises(UserError, match=words):
      loop.run(config, str(workdir))
  data_file = helpers.teacherless_config(**{'data.data_dir': str(a_file)})
  with pytest.raises(UserError, match='data_dir=.*is a file'):
    loop.run(data_file, str(tmp_path / 'w'))
  assert sorted(os.listdir(tmp_path)) == ['a_file'] and a_file.read_text() == 'mine'


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_read_only_workdir(tmp_path):
  ro = tmp_path / 'ro'
  ro.mkdir(mode=0o500)
  config = helpers.teacherless_config(**{'data.data_dir': str(tmp_path / 'data')})
  with pytest.raises(UserError, match='not writable'):
    loop.run(config, str(ro / 'w'))


CLI_CASES = [
    ('missing_config_file', ['--config=configs/nope.py'], 'configs/nope.py'),
    ('unknown_field', ['--config=configs/pretrain.py:smoke', '--config.not_a_field=1'],
     'unknown config field --config.not_a_field'),
    ('keep_checkpoints=0', ['--config=configs/pretrain.py:smoke,mask=random',
                            '--config.loss_weights.mrm=0', '--config.keep_checkpoints=0'],
     'keep_checkpoints=0'),
]


@pytest.mark.parametrize('args,words', [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_exactly_one_error_line(tmp_path, args, words):
  workdir = tmp_path / 'w'
  r = helpers.run_python('-m', 'clusterstm_jax.train', *args, f'--workdir={workdir}',
                         f'--config.data.data_dir={tmp_path / "data"}' if len(args) > 1 else
                         f'--workdir={workdir}', timeout=120)
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert r.returncode in (1, 2) and len(errors) == 1, r.stderr[-2000:]
  assert words in errors[0] and 'Traceback' not in r.stderr
  assert not workdir.exists() and not (tmp_path / 'data').exists()
