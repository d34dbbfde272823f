r"""The tiny SigLIP teacher for shapes: two towers, sigmoid loss, frames paired with captions.

  python -m clusterstm_jax.train --config=configs/teacher.py --workdir=workdirs/teacher
  python -m clusterstm_jax.export --workdir=workdirs/teacher

The default pretraining config runs this itself when its teacher is missing (and reuses it
after), so this command is only needed to train a teacher by hand. At most ~3 minutes here.
"""
import ml_collections

from configs import common
from clusterstm_jax import config_lib
from clusterstm_jax.data.pipeline import default_data_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=-1)
  config = ml_collections.ConfigDict()
  config.task = 'siglip'
  common.training_config(config)
  config.data = default_data_config()
  # Two frames of each clip as images: the teacher is per-frame, so this halves its training
  # cost; the student still sees 4 frames and the teacher embeds each of them.
  config.data.num_frames = 2
  config.data.image_size = 64

  config.model = ml_collections.ConfigDict()
  config.model.vision_variant = 'Mu/8'
  config.model.text_variant = 'Mu'
  config.model.embed_dim = None  # SigLIP layout: no image head, text head to the image width
  # SigLIP's init (t = 10, b = -10) suits its 32k batches: at batch 64 every negative's sigmoid
  # starts at ~5e-5, only positives pull, and the towers drift together instead of apart. A bias
  # at the log prior odds of a match, -log(batch - 1), makes positives and negatives pull alike.
  config.model.temperature_init = 10.0
  config.model.bias_init = -4.0

  config.batch_size = 64
  config.eval_batch_size = 128
  # 200 steps: the sigmoid loss sits at its no-information value (64 H(1/64) = 5.15) for ~50
  # steps before the towers separate; at 100 steps the teacher was still learning fast.
  config.total_steps = 200
  config.warmup_steps = 10
  config.optax.lr = 1e-3  # 3e-3 learnt slower (loss 4.33 against 3.78 by step ~100-125)
  # The scalars t and b move 10x faster than Adam's lr per step would allow.
  config.optax.scalar_lr_mult = 10.0
  config.optax.wd = 1e-4
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200

  if arg.smoke:
    config.data.builder_config = 'tiny'
    config.model.vision_variant = 'Pico/8'
    config.model.text_variant = 'Pico'
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 4
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
  if arg.steps > 0:
    config.total_steps = arg.steps
  return config
