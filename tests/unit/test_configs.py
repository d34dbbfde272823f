"""The shipped configs' defaults and their validation, without running anything: the image
stream (config.images) is off by default and leaves the schedule alone, bad image settings are
one-line config errors, the fine-tuning defaults drop pretraining-only settings."""
import pytest

from configs import pretrain
from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax.data import pipeline
from tests import helpers

pytestmark = pytest.mark.unit


def test_images_off_by_default_and_schedule_unchanged():
  for arg in (None, 'smoke', 'mask=random'):
    config = pretrain.get_config(arg)
    assert config.images.every == 0 and config_lib.image_every(config) == 0
  config = pretrain.get_config(None)
  assert (config.total_steps, config.unmasked_steps, config.batch_size) == (180, 20, 64)
  kinds = [loop.step_kind(config, s, 180) for s in range(180)]
  assert kinds == ['video'] * 160 + ['unmasked'] * 20
  assert loop.examples_per_step(config) == 64

  on = pretrain.get_config('images')
  assert (on.images.every, on.images.name, on.images.split) == (2, 'shapes', 'train')
  kinds = [loop.step_kind(on, s, 200) for s in range(200)]
  # Every 2nd step is an image step; unmasked tuning (the last 20) is video-only.
  assert kinds[:4] == ['video', 'image', 'video', 'image']
  assert kinds[180:] == ['unmasked'] * 20 and kinds.count('image') == 90
  data = pipeline.image_data_config(on)
  assert (data.name, data.num_frames, data.builder_config) == ('shapes', 1, 'default')

  paper = pretrain.get_config('paper')
  assert (paper.images.every, paper.images.name, paper.images.split) == (2, 'cc3m', 'train')
  assert pipeline.image_data_config(paper).builder_config == 'default'
  assert loop.examples_per_step(paper) == 2048  # epochs then count videos + images


@pytest.mark.parametrize('field,value,match', [
    ('images.every', 1, 'images.every=1'),
    ('images.every', -2, 'images.every=-2'),
    ('images.batch_size', 12, 'images.batch_size=12 is not divisible by the 8'),
    ('images.batch_size', 0, 'images.batch_size=0'),
    ('images.split', '', 'images.split'),
])
def test_bad_image_settings_are_one_line_config_errors(field, value, match):
  config = pretrain.get_config('smoke,images')
  node, key = field.split('.')
  config[node][key] = value
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(config, num_devices=8, process_count=1)
  assert '\n' not in str(e.value)


def test_default_finetune_configs_drop_pretraining_only_settings():
  # The smoke configs turn these off anyway; the defaults must too (a default fine-tune
  # inheriting pretraining's unmasked_steps stopped at build time).
  for name, (module, task) in helpers.FINETUNES.items():
    config = module.get_config()
    assert config.task == task and config.get('unmasked_steps', 0) == 0, name
    assert 'teacher' not in config and 'mrm' not in config, name
    assert set(config.evals) == {name}, name
