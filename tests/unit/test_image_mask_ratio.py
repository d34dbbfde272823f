"""The image stream's own mask ratio (config.images.mask_ratio; UMT masks images at 0.5 and
videos at the video ratio): what the image step's loss masks with, traced (no compile)."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax.masking import strategies
from clusterstm_jax.tasks import siglip as siglip_task

pytestmark = pytest.mark.unit
VOCAB = 64


def test_image_steps_mask_at_their_own_ratio(monkeypatch):
  config = config_lib.load_config_file('configs/pretrain.py:smoke,images')
  config = config_lib.with_overrides(config, **{'images.mask_ratio': 0.5})
  tconfig = config_lib.load_config_file('configs/teacher.py:smoke')
  tmodel = siglip_task.make_model(tconfig, VOCAB)
  tparams = nn.unbox(jax.eval_shape(lambda r: tmodel.init(r, *siglip_task.init_inputs(tconfig)),
                                    jax.random.key(0))['params'])
  teacher = teacher_lib.Teacher(model=tmodel, params=tparams, param_shardings=None)
  task = tasks_lib.get(config, tasks_lib.TextSpec(VOCAB), teacher)
  params = nn.unbox(jax.eval_shape(lambda r: task.model.init({'params': r, 'dropout': r},
                                                             *task.init_inputs)['params'],
                                   jax.random.key(0)))
  seen = []
  real = strategies.mask_from_config

  def spy(mask_config, rng, shape, features=None):
    seen.append((mask_config.ratio, shape))
    return real(mask_config, rng, shape, features)

  monkeypatch.setattr(strategies, 'mask_from_config', spy)
  for loss_fn, image in ((task.image_loss_fn, True), (task.loss_fn, False)):
    batch = task.dummy_batch(4, image=image)
    out = jax.eval_shape(functools.partial(loss_fn, rng=jax.random.key(1)), params, batch,
                         teacher_params=tparams)
    assert np.shape(out[0]) == ()
  (image_ratio, image_shape), (video_ratio, video_shape) = seen
  assert (image_ratio, video_ratio) == (0.5, config.mask.ratio) == (0.5, 0.85)
  assert image_shape[1] == 1 and video_shape[1] == config.data.num_frames
  # Off by default: -1 = the video ratio, one loss for both streams' masks.
  default = config_lib.load_config_file('configs/pretrain.py:smoke,images')
  assert default.images.mask_ratio == -1.0
