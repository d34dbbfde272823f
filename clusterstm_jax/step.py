"""Builds the model, optimizer, sharded state and the jitted train / eval steps.

One home for "teacher -> mask -> student -> losses -> update": train.py, the benchmarks, the
compile report and the tests all build their steps here, so what is measured is what is trained.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clusterstm_jax import config_lib
from clusterstm_jax import losses as losses_lib
from clusterstm_jax import objectives
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.masking import stats as mask_stats
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import common as common_lib
from clusterstm_jax.models import siglip as siglip_lib

State = dict  # {'step': int32[], 'params': pytree, 'opt_state': pytree}


def normalize_video(video):
  """uint8 [..., 3] -> float32 in [-1, 1] (done on device: the host ships bytes, not floats)."""
  return video.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def patch_size(config) -> int:
  return common_lib.parse_variant(config.model.vision_variant)[1]


def grid(config) -> tuple[int, int, int]:
  """(T, h, w) token grid of the student (and teacher: both use the same patch grid)."""
  n = config.data.image_size // patch_size(config)
  return config.data.num_frames, n, n


def make_model(config, vocab_size: int) -> clusterstm_lib.ClusterSTM:
  return clusterstm_lib.ClusterSTM(config=config.model, vocab_size=vocab_size,
                                   num_frames=config.data.num_frames,
                                   image_size=config.data.image_size,
                                   max_text_len=config.data.max_text_len)


def make_siglip(config, vocab_size: int) -> siglip_lib.SigLIP:
  return siglip_lib.SigLIP(variant=config.model.vision_variant,
                           text_variant=config.model.text_variant,
                           image_size=config.data.image_size, vocab_size=vocab_size,
                           text_len=config.data.max_text_len,
                           out_dim=config.model.get('embed_dim'))


def siglip_init_inputs(config):
  s, l = config.data.image_size, config.data.max_text_len
  return (jnp.zeros((2, s, s, 3), jnp.float32), jnp.zeros((2, l), jnp.int32))


def abstract_params(model, inputs):
  """Boxed (logically partitioned) abstract params: shapes first, no allocation."""
  return jax.eval_shape(
      lambda r: model.init({'params': r, 'dropout': r}, *inputs)['params'], jax.random.key(0))


def make_optimizer(config, total_steps: int, warmup_steps: int):
  o = config.optax
  warmup = max(warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)
  # No weight decay on biases, norms, the temperature and position tables of rank < 2.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.wd, mask=decay_mask))
  return tx, schedule


def dummy_batch(config, batch_size: int, *, image: bool = False) -> dict[str, np.ndarray]:
  """A batch of the pipeline's shapes and dtypes (used for init and compilation); `image`: a
  batch of the image stream (T = 1)."""
  if config.get('task') == 'qa':  # QA batches carry questions and answers (downstream.py)
    from clusterstm_jax import downstream
    return downstream.dummy_batch(config, batch_size)
  t, s, l = config.data.num_frames, config.data.image_size, config.data.max_text_len
  t = 1 if image else t
  return dict(video=np.zeros((batch_size, t, s, s, 3), np.uint8),
              text=np.zeros((batch_size, l), np.int32),
              labels=np.zeros((batch_size, t, s, s), np.uint8),
              index=np.zeros((batch_size,), np.int32))


def needs_teacher(config) -> bool:
  """The student needs teacher features for cluster masking and for the MRM target."""
  if config.get('task', 'clusterstm') != 'clusterstm':
    return False
  return (config.mask.strategy in masking.CLUSTER_STRATEGIES
          or config.loss_weights.get('mrm', 0.0) > 0)


@dataclasses.dataclass
class Task:
  """What differs between the student (clusterstm) and teacher (siglip) trainings."""
  model: nn.Module
  init_inputs: tuple
  loss_fn: Callable      # (params, batch, rng, teacher_params) -> (loss, metrics)
  encode_video: Callable  # (params, video uint8 [B,T,H,W,3]) -> normalised [B,T,E]
  encode_text: Callable   # (params, ids [B,L]) -> normalised [B,E]
  # The same objective on every token (no masking, no MRM, no teacher): FLIP's "unmasked
  # tuning", run for the last `config.unmasked_steps` steps. None where a task has no masking.
  unmasked_loss_fn: Callable | None = None


def make_task(config, text: 'TextSpec', teacher=None) -> Task:
  task = config.get('task', 'clusterstm')
  if task == 'clusterstm':
    return _clusterstm_task(config, text, teacher)
  if task == 'siglip':
    return _siglip_task(config, text.vocab_size)
  from clusterstm_jax import downstream  # retrieval_ft, qa, caption
  return downstream.make_task(config, text)


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The tokenizer facts the losses need (MLM masking); no tokenizer object inside jit."""
  vocab_size: int
  pad_id: int = 0
  cls_id: int = 2
  eos_id: int = 3
  mask_id: int = 4

  @classmethod
  def from_tokenizer(cls, tok) -> 'TextSpec':
    return cls(tok.vocab_size, tok.pad_id, tok.cls_id, tok.eos_id, tok.mask_id)


def _clusterstm_task(config, text: TextSpec, teacher) -> Task:
  model = make_model(config, text.vocab_size)
  t, h, w = grid(config)  # t: the init inputs' frames; the loss takes T from each batch
  n = h * w
  patch = patch_size(config)
  weights = config.loss_weights
  use = {k: float(weights.get(k, 0.0)) > 0 for k in ('vtc', 'vtm', 'mlm', 'mrm')}
  if use['mrm'] and not config.model.decoder.out_dim:
    raise ValueError('loss_weights.mrm > 0 needs model.decoder.out_dim (the teacher width)')

  def loss_fn(params, batch, rng, teacher_params, *, unmasked=False):
    mask_rng, dropout_rng, vtm_rng, mlm_rng = jax.random.split(rng, 4)
    video = normalize_video(batch['video'])
    ids = batch['text']
    # T from the batch (static under jit): config.data.num_frames for videos, 1 for the image
    # stream's batches, which then get the T = 1 position tables, masking and decoder grid.
    b, t = video.shape[:2]
    apply = functools.partial(model.apply, {'params': params}, rngs={'dropout': dropout_rng})
    use_mrm = use['mrm'] and not unmasked

    # Teacher: all tokens of every frame (no gradient), used by the masking and the MRM target.
    features = mask = None
    if teacher is not None and not unmasked:
      features = jax.lax.stop_gradient(teacher.frame_tokens(teacher_params, video))
    if not unmasked:
      mask = masking.mask_from_config(config.mask, mask_rng, (b, t, n), features)

    # Student on the visible tokens only (every token during unmasked tuning).
    keep_idx = None if unmasked else mask.keep_idx
    video_feat, tokens = apply(video, keep_idx, train=True, method=model.encode_video)
    text_feat, hidden = apply(ids, train=True, method=model.encode_text)
    temperature = apply(method=model.temperature)
    sim = objectives.video_text_similarity(video_feat, text_feat)
    terms = {'vtc': objectives.vtc_loss(sim, temperature)}

    if use['vtm']:
      # Pairs [positive; negative video for each text; negative text for each video].
      neg_text, neg_video = losses_lib.sample_hard_negatives(sim / temperature, vtm_rng)
      hid3 = jnp.concatenate([hidden, hidden, hidden[neg_text]])
      ids3 = jnp.concatenate([ids, ids, ids[neg_text]])
      tok3 = jnp.concatenate([tokens, tokens[neg_video], tokens])
      fused = apply(hid3, ids3, tok3, train=True, method=model.fuse)
      logits = apply(fused, method=model.vtm_logits)
      terms['vtm'] = losses_lib.vtm_loss(logits)
    if use['mlm']:
      masked_ids, targets, mlm_w = losses_lib.mlm_mask(
          ids, mlm_rng, mask_id=text.mask_id, vocab_size=text.vocab_size,
          special_ids=(text.pad_id, text.cls_id, text.eos_id))
      _, masked_hidden = apply(masked_ids, train=True, method=model.encode_text)
      fused = apply(masked_hidden, masked_ids, tokens, train=True, method=model.fuse)
      terms['mlm'] = losses_lib.mlm_loss(apply(fused, method=model.mlm_logits), targets, mlm_w)
    if use_mrm:
      k = config.mrm.window
      pooled = teacher.relevance_tokens(teacher_params, features, (h, w), k)
      text_emb = jax.lax.stop_gradient(teacher.text_embedding(teacher_params, ids))
      in_batch = config.mrm.in_batch
      target = losses_lib.relevance_target(pooled, text_emb, in_batch=in_batch)
      decoded = apply(tokens, mask.keep_idx, (t, h, w), train=True, method=model.decode)
      student = losses_lib.student_relevance(decoded, text_emb, in_batch=in_batch)
      terms['mrm'] = losses_lib.mrm_loss(student, target, mask.keep_mask)

    loss = sum(weights.get(k, 0.0) * v for k, v in terms.items() if use[k] or k == 'vtc')
    metrics = dict(terms, temperature=temperature)
    if mask is not None:
      token_obj = mask_stats.token_objects(batch['labels'], patch)
      metrics.update({f'mask/{k}': v for k, v in
                      mask_stats.mask_stats(mask.keep_mask, token_obj).items()})
    return loss, metrics

  def encode_video(params, video):
    return model.apply({'params': params}, normalize_video(video), None,
                       method=model.encode_video)[0]

  def encode_text(params, ids):
    return model.apply({'params': params}, ids, method=model.encode_text)[0]

  s, l = config.data.image_size, config.data.max_text_len
  inputs = (jnp.zeros((2, t, s, s, 3), jnp.float32), jnp.zeros((2, l), jnp.int32))
  return Task(model, inputs, loss_fn, encode_video, encode_text,
              unmasked_loss_fn=functools.partial(loss_fn, unmasked=True))


def _siglip_task(config, vocab_size) -> Task:
  """The teacher's own training: every frame of a clip is an image paired with its caption."""
  model = make_siglip(config, vocab_size)

  def embed_frames(params, video, train, rngs=None):
    b, t = video.shape[:2]
    zimg, _ = model.apply({'params': params}, video.reshape(b * t, *video.shape[2:]),
                          train=train, rngs=rngs, method=model.encode_image)
    return zimg.reshape(b, t, -1)

  def loss_fn(params, batch, rng, teacher_params):
    del teacher_params
    rngs = {'dropout': rng}
    zimg = embed_frames(params, normalize_video(batch['video']), True, rngs)
    ztxt = model.apply({'params': params}, batch['text'], train=True, rngs=rngs,
                       method=model.encode_text)
    loss = objectives.sigmoid_loss_frames(zimg, ztxt, params['t'], params['b'])
    return loss, dict(sigmoid=loss, log_t=params['t'][0], bias=params['b'][0])

  def encode_video(params, video):
    return objectives.l2_normalize(embed_frames(params, normalize_video(video), False))

  def encode_text(params, ids):
    return objectives.l2_normalize(model.apply({'params': params}, ids,
                                               method=model.encode_text))

  return Task(model, siglip_init_inputs(config), loss_fn, encode_video, encode_text)


@dataclasses.dataclass
class Trainer:
  """Everything a run needs to step: the task, optimizer, mesh, shardings and jitted functions."""
  config: ml_collections.ConfigDict
  task: Task
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


def state_layout(task: Task, tx, mesh, rules):
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


def build_trainer(config, *, mesh, total_steps: int, warmup_steps: int, teacher=None,
                  vocab_size: int | None = None, text: TextSpec | None = None) -> Trainer:
  """`text` (or just `vocab_size`, with default special ids) describes the tokenizer."""
  text = text or TextSpec(vocab_size)
  if needs_teacher(config) and teacher is None:
    raise ValueError(f'mask.strategy={config.mask.strategy!r} / loss_weights.mrm need a teacher '
                     '(config.teacher)')
  task = make_task(config, text, teacher)
  tx, schedule = make_optimizer(config, total_steps, warmup_steps)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  repl = sharding_lib.replicated(mesh)
  init_params, state_shardings, abstract_state = state_layout(task, tx, mesh, rules)

  def _init(rng):
    params = nn.unbox(init_params(rng))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def train_step(state, batch, base_key, teacher_params, *, loss_fn):
    # Randomness from (base key, step): a resumed run replays exactly the same masks/dropout.
    rng = jax.random.fold_in(base_key, state['step'])
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], batch, rng, teacher_params)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics.update(loss=loss, lr=schedule(state['step']),
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates))
    return dict(step=state['step'] + 1, params=params, opt_state=opt_state), metrics

  example = dummy_batch(config, 2)
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
        raise ValueError(f'unmasked_steps > 0 needs a masked task, not {config.get("task")!r}')
      jitted_unmasked = jit_step(task.unmasked_loss_fn)
    # Its own jitted function, as the unmasked step: the same loss traced at T = 1 (static
    # shapes), so video and image steps never retrace each other.
    jitted_image = None
    if config_lib.image_every(config):
      if config.get('task', 'clusterstm') != 'clusterstm':
        raise ValueError(f'images.every > 0 needs the clusterstm task, not {config.get("task")!r}')
      jitted_image = jit_step(task.loss_fn)
    enc_v = jax.jit(task.encode_video, out_shardings=repl)
    enc_t = jax.jit(task.encode_text, out_shardings=repl)
  teacher_params = teacher.params if teacher is not None else None

  def under_mesh(fn):
    def wrapped(*args, **kwargs):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args, **kwargs)
    return wrapped

  def bind(jitted_step):
    """(state, batch, base_key) -> (state, metrics), the frozen teacher params bound."""
    return under_mesh(lambda s, b, k: jitted_step(s, b, k, teacher_params))

  def lower(batch_size: int, *, image: bool = False):
    """Ahead-of-time lowering on abstract inputs (compile reports, paper-scale checks);
    `image`: the image stream's step (T = 1)."""
    if image and jitted_image is None:
      raise ValueError('lower(image=True) needs an image stream (config.images.every > 0)')
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract_state, state_shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shard[k])
             for k, v in dummy_batch(config, batch_size, image=image).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    tparams = None
    if teacher is not None:
      tparams = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             teacher.params, teacher.param_shardings)
    return (jitted_image if image else jitted).lower(state, batch, key, tparams)

  return Trainer(config=config, task=task, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
                 state_shardings=state_shardings, abstract_state=abstract_state,
                 train_step=bind(jitted),
                 train_step_unmasked=None if jitted_unmasked is None else bind(jitted_unmasked),
                 train_step_image=None if jitted_image is None else bind(jitted_image),
                 init_state=under_mesh(init_state), encode_video=under_mesh(enc_v),
                 encode_text=under_mesh(enc_t), teacher=teacher, lower=under_mesh(lower))


def restore_params(config, ckpt_dir: str, step: int, mesh, vocab_size: int):
  """Params only, from a training checkpoint (export, evaluation)."""
  from clusterstm_jax import checkpointing
  task = make_task(config, TextSpec(vocab_size))
  tx, _ = make_optimizer(config, 1, 0)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  _, shardings, abstract_state = state_layout(task, tx, mesh, rules)
  manager = checkpointing.make_manager(ckpt_dir, read_only=True, async_save=False,
                                       with_data=False)
  abstract = checkpointing.abstract_with_shardings(abstract_state, shardings)
  return checkpointing.restore(manager, step, abstract)['params']
