r"""ClusterSTM pretraining.

Default (no arg): the embedded "shapes" dataset on this CPU; prints a zero-shot retrieval table.
  python -m clusterstm_jax.train --config=configs/pretrain.py
Knobs (comma-separated after ':'):
  smoke       a few steps of a tiny model on the tiny shapes split (tests and CI).
  mask=NAME   masking strategy: clusterstm, clusterstm_random_pick, random, tube.
"""
import ml_collections

from configs import common
from clusterstm_jax import config_lib
from clusterstm_jax.data.pipeline import default_data_config
from clusterstm_jax.masking.strategies import default_mask_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, mask='clusterstm', steps=-1, ratio=0.85)
  config = ml_collections.ConfigDict()
  common.training_config(config)

  config.data = default_data_config()
  config.data.num_frames = 4
  config.data.image_size = 64

  config.model = ml_collections.ConfigDict()
  config.model.vision_variant = 'Mu/8'
  config.model.text_variant = 'Mu'
  config.model.text_depth = None
  config.model.text_fusion_layers = 1
  config.model.embed_dim = 64
  config.model.temp_init = 0.07
  config.model.dropout = 0.0

  config.mask = default_mask_config()
  config.mask.strategy = arg.mask
  config.mask.ratio = arg.ratio

  # The frozen teacher whose tokens drive the cluster masking (and the MRM target). With no
  # export given, it is trained once with `config` into `workdir` and reused after.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.export = ''
  config.teacher.workdir = 'workdirs/teacher'
  config.teacher.config = 'configs/teacher.py'

  config.loss_weights = ml_collections.ConfigDict(dict(vtc=1.0))

  config.batch_size = 64
  config.eval_batch_size = 128
  config.total_steps = 600
  config.warmup_steps = 50
  config.optax.lr = 1e-3
  config.optax.wd = 0.02
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200

  if arg.smoke:
    config.data.builder_config = 'tiny'
    config.teacher.workdir = 'workdirs/teacher_smoke'
    config.teacher.config = 'configs/teacher.py:smoke'
    config.model.vision_variant = 'Pico/8'
    config.model.text_variant = 'Pico'
    config.model.text_depth = 2
    config.model.embed_dim = 32
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
  if arg.steps > 0:
    config.total_steps = arg.steps
  return config
