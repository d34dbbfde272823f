"""The optimizer, the shapes-first sharded train state and the jitted train steps of a task.

One home for "update": train runs, the benchmarks, the compile report and the tests all build
their steps here, so what is measured is what is trained. The trainer knows a task only through
the `tasks.Task` interface.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from clusterstm_jax import config_lib
from clusterstm_jax import program_cache
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import teacher_cache
from clusterstm_jax.errors import UserError

State = dict  # {'step': int32[], 'params': pytree, 'opt_state': pytree}


def make_optimizer(config, total_steps: int, warmup_steps: int):
  o = config.optax
  warmup = max(warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)
  tune_steps, tune_lr = config.get('unmasked_steps', 0), float(o.get('unmasked_lr', 0.0))
  if tune_steps > 0 and tune_lr > 0:
    # FLIP's unmasked tuning is a schedule of its own: the main cosine has all but ended when
    # the last steps start (lr ~ lr * min_lr_ratio: the all-token features could not move),
    # so those steps restart at unmasked_lr and decay by a cosine over themselves.
    schedule = optax.join_schedules(
        [schedule, optax.cosine_decay_schedule(tune_lr, tune_steps, alpha=o.min_lr_ratio)],
        [total_steps - tune_steps])
  # No weight decay on biases, norms, the temperature and position tables of rank < 2.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.wd, mask=decay_mask)]
  if o.get('grad_clip_norm', 0.0) > 0:
    parts.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  mult = float(o.get('scalar_lr_mult', 1.0))
  if mult != 1.0:
    # Single-element parameters (a temperature, a logit bias) move by about lr per Adam step,
    # whatever their gradient: at lr 1e-3 a SigLIP bias initialised at -10 barely moves in a
    # few hundred steps. Their updates are scaled by `scalar_lr_mult`.
    parts.append(optax.stateless(
        lambda updates, params: jax.tree.map(lambda u: u * mult if u.size == 1 else u, updates)))
  return optax.chain(*parts), schedule


@dataclasses.dataclass
class Trainer:
  """Everything a run needs to step: the task, optimizer, mesh, shardings and jitted functions."""
  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  tx: optax.GradientTransformation
  schedule: Callable
  mesh: jax.sharding.Mesh
  rules: Any
  state_shardings: Any
  abstract_state: Any
  train_step: Callable   # (state, batch, base_key) -> (state, metrics)
  init_state: Callable   # (rng) -> state, born sharded
  encode_video: Callable  # jitted, replicated output
  encode_text: Callable
  teacher: Any = None     # frozen teacher; its params are passed to the step, never trained
  lower: Callable = None  # (batch_size) -> jax.stages.Lowered of the train step, no data needed
  # The step of the last `config.unmasked_steps` steps (every token, no MRM); None when unused.
  train_step_unmasked: Callable | None = None
  # The image stream's step (batches with T = 1, config.images); None when images.every = 0.
  train_step_image: Callable | None = None


def state_layout(task: tasks_lib.Task, tx, mesh, rules):
  """Shapes first: (init_params, state shardings, abstract state), nothing allocated."""
  repl = sharding_lib.replicated(mesh)

  def init_params(rng):
    return task.model.init({'params': rng, 'dropout': rng}, *task.init_inputs)['params']

  boxed = jax.eval_shape(init_params, jax.random.key(0))
  param_shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  abstract_params_ = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params_)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
  state_shardings = dict(step=repl, params=param_shardings, opt_state=opt_shardings)
  abstract_state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params_,
                        opt_state=abstract_opt)
  return init_params, state_shardings, abstract_state


def accumulate(grad_fn, micro: int, mesh, params, batch, rng, teacher_params):
  """(loss, metrics, grads) of `batch`, as the mean over `micro` equal micro-batches.

  grad_fn: value_and_grad(loss_fn, has_aux=True). With micro = 1 it is one call. Otherwise a
  lax.scan runs grad_fn on micro-batch i (rows i, i + micro, i + 2 micro, ...: every
  micro-batch spans every batch shard, so each device works on its own rows) with rng
  fold_in(rng, i), and sums loss, metrics and gradients (f32), then divides by `micro`.
  Only one micro-batch's activations are live at a time.

  This is the full batch's update exactly when the loss is a mean of deterministic
  per-example terms (MRM under cluster masking). Random per-example choices (MLM's token
  masks) are drawn per micro-batch, and in-batch terms see one micro-batch: VTC's contrastive
  softmax and the VTM hard negatives are those of a batch of batch_size / micro (GradCache-style
  exact contrastive accumulation is not implemented). tests/unit/test_memory.py checks both.
  """
  if micro == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng, teacher_params)
    return loss, metrics, grads
  spec = lambda ndim: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES, *([None] * (ndim - 2))))

  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, spec(x.ndim))

  micro_batches = jax.tree.map(split, batch)

  def one(i, mb):
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), teacher_params)
    return jax.tree.map(lambda x: x.astype(jnp.float32), (loss, metrics, grads))

  def body(total, xs):
    return jax.tree.map(jnp.add, total, one(*xs)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, 0, first))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(micro), micro_batches))
  return jax.tree.map(lambda x: x / micro, total)


def build_trainer(config, *, mesh, total_steps: int, warmup_steps: int, teacher=None,
                  vocab_size: int | None = None,
                  text: tasks_lib.TextSpec | None = None,
                  program_dir: str | None = None) -> Trainer:
  """`text` (or just `vocab_size`, with default special ids) describes the tokenizer.
  `program_dir`: keep the lowered train steps there (program_cache.py): a relaunch skips
  tracing them."""
  text = text or tasks_lib.TextSpec(vocab_size)
  if tasks_lib.needs_teacher(config) and teacher is None:
    raise ValueError(f'mask.strategy={config.mask.strategy!r} / loss_weights.mrm need a teacher '
                     '(config.teacher)')
  if tasks_lib.uses_teacher_cache(config):  # e.g. no image stream: its batches have no view
    teacher_cache.check_config(config)
  task = tasks_lib.get(config, text, teacher)
  tx, schedule = make_optimizer(config, total_steps, warmup_steps)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  repl = sharding_lib.replicated(mesh)
  init_params, state_shardings, abstract_state = state_layout(task, tx, mesh, rules)

  def _init(rng):
    params = nn.unbox(init_params(rng))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  micro = config.get('microbatches', 1)

  def train_step(state, batch, base_key, teacher_params, *, loss_fn):
    # Randomness from (base key, step): a resumed run replays exactly the same masks/dropout.
    rng = jax.random.fold_in(base_key, state['step'])
    loss, metrics, grads = accumulate(jax.value_and_grad(loss_fn, has_aux=True), micro, mesh,
                                      state['params'], batch, rng, teacher_params)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if task.project_params is not None:  # e.g. the temperature clamped into its range (UMT)
      params = task.project_params(params)
    metrics.update(loss=loss, lr=schedule(state['step']),
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates))
    # One on-device flag per step (the loop fetches them on log/checkpoint steps only): every
    # metric, the gradients and the new params (param_norm) finite.
    metrics['finite'] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                                           for v in jax.tree.leaves(metrics)]))
    return dict(step=state['step'] + 1, params=params, opt_state=opt_state), metrics

  example = task.dummy_batch(2)
  batch_shard = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in example.items()}
  teacher_shardings = teacher.param_shardings if teacher is not None else None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_state = jax.jit(_init, out_shardings=state_shardings)
    def jit_step(loss_fn):
      return jax.jit(functools.partial(train_step, loss_fn=loss_fn),
                     in_shardings=(state_shardings, batch_shard, repl, teacher_shardings),
                     out_shardings=(state_shardings, repl), donate_argnums=(0,))

    jitted = jit_step(task.loss_fn)
    jitted_unmasked = None
    if config.get('unmasked_steps', 0) > 0:
      if task.unmasked_loss_fn is None:
        raise UserError(f'unmasked_steps > 0 needs a masked task, not {task.name!r}')
      jitted_unmasked = jit_step(task.unmasked_loss_fn)
    # Its own jitted function, as the unmasked step: the same loss traced at T = 1 (static
    # shapes), so video and image steps never retrace each other.
    jitted_image = None
    if config_lib.image_every(config):
      if not task.takes_images:
        raise UserError(f'images.every={config_lib.image_every(config)} needs task clusterstm, '
                        f'not {task.name!r}')
      jitted_image = jit_step(task.image_loss_fn or task.loss_fn)
    enc_v = jax.jit(task.encode_video, out_shardings=repl)
    enc_t = jax.jit(task.encode_text, out_shardings=repl)
  teacher_params = teacher.params if teacher is not None else None

  def under_mesh(fn):
    def wrapped(*args, **kwargs):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args, **kwargs)
    return wrapped

  steps = {'train_step': jitted, 'train_step_unmasked': jitted_unmasked,
           'train_step_image': jitted_image}
  if program_dir:
    # Everything the traced steps close over beyond their arguments' shapes.
    cache = program_cache.ProgramCache(program_dir, {
        'config': program_cache.config_fingerprint(config), 'total_steps': total_steps,
        'warmup_steps': warmup_steps, 'text': dataclasses.asdict(text),
        'model': program_cache.stable_repr(task.model),
        'teacher': None if teacher is None else program_cache.stable_repr(teacher.model)})
    steps = program_cache.wrap_all(cache, steps, under_mesh)

  def bind(step):
    """(state, batch, base_key) -> (state, metrics), the frozen teacher params bound."""
    return None if step is None else under_mesh(lambda s, b, k: step(s, b, k, teacher_params))

  def lower(batch_size: int, *, image: bool = False):
    """Ahead-of-time lowering on abstract inputs (compile reports, paper-scale checks);
    `image`: the image stream's step (T = 1)."""
    if image and jitted_image is None:
      raise ValueError('lower(image=True) needs an image stream (config.images.every > 0)')
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract_state, state_shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shard[k])
             for k, v in task.dummy_batch(batch_size, image=image).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    tparams = None
    if teacher is not None:
      tparams = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             teacher.params, teacher.param_shardings)
    return (jitted_image if image else jitted).lower(state, batch, key, tparams)

  return Trainer(config=config, task=task, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
                 state_shardings=state_shardings, abstract_state=abstract_state,
                 train_step=bind(steps['train_step']),
                 train_step_unmasked=bind(steps['train_step_unmasked']),
                 train_step_image=bind(steps['train_step_image']),
                 init_state=under_mesh(init_state), encode_video=under_mesh(enc_v),
                 encode_text=under_mesh(enc_t), teacher=teacher, lower=under_mesh(lower))
