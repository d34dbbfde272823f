"""Pieces shared by the configs: training, optimizer, mesh, logging and checkpoint defaults."""
import ml_collections

# Logical axis -> mesh axis rule sets (see clusterstm_jax/sharding.py). `batch` always spans the
# data-parallel axes; the rule set decides how parameters are split.
RULE_SETS = ('data', 'fsdp', 'fsdp_tensor')


def training_config(config: ml_collections.ConfigDict) -> None:
  """Adds fields every train config has; the caller sets values after."""
  config.seed = 0
  config.batch_size = 64
  # Exactly one of total_steps / total_epochs / total_examples (config_lib.steps).
  config.total_steps = -1
  config.total_epochs = -1.0
  config.total_examples = -1
  config.warmup_steps = -1
  config.warmup_epochs = -1.0
  config.warmup_examples = -1

  # Memory policy (models/common.py, trainer.py): the dtype of activations and matmuls
  # ('float32' | 'bfloat16'; params, optimizer state and losses stay float32), what the
  # transformer blocks keep for the backward pass ('none' | 'full' | 'dots_saveable' |
  # 'dots_no_batch'), and the number of micro-batches whose gradients one step accumulates.
  config.dtype = 'float32'
  config.remat = 'none'
  config.microbatches = 1
  # jax's persistent compilation cache (clusterstm_jax/compile_cache.py): '' = WORKDIR/jax_cache,
  # a directory, or 'off'. A relaunch then reads its compiled programs instead of compiling.
  config.compile_cache = ''

  config.optax = ml_collections.ConfigDict()
  config.optax.lr = 1e-4
  config.optax.wd = 0.02
  config.optax.b1 = 0.9
  config.optax.b2 = 0.999
  config.optax.grad_clip_norm = 1.0  # 0 = no clipping
  # Update scale of single-element parameters (temperature, logit bias); trainer.make_optimizer.
  config.optax.scalar_lr_mult = 1.0
  config.optax.min_lr_ratio = 0.01  # cosine decays to lr * min_lr_ratio
  # Peak lr of the unmasked tuning steps (config.unmasked_steps), a cosine of their own; 0 = they
  # take the main schedule's tail (trainer.make_optimizer).
  config.optax.unmasked_lr = 0.0

  # A tuple (not a list) so that --config.mesh='(("data", 1), ("fsdp", -1), ("tensor", 1))' works.
  config.mesh = (('data', -1), ('fsdp', 1), ('tensor', 1))
  config.sharding_rules = 'data'  # one of RULE_SETS

  config.log_every_steps = 20
  # The run's end-of-run evaluators every N steps too (metrics.jsonl / TensorBoard under eval/,
  # table printed); 0 = only at the end.
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2  # the newest N checkpoints (>= 1)
  # Also keep every checkpoint whose step is a multiple of this (sparse history); 0: off.
  config.keep_period = 0
  config.async_checkpointing = True
  # Resume order: this workdir's latest checkpoint -> `resume` (a checkpoint dir) -> `init`
  # (pretrained weights) -> scratch.
  config.resume = ''
  # Stop (after checkpointing) once this step is reached, as a preempted run would; -1 = never.
  config.halt_at_step = -1
  config.init = ''
