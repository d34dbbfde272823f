"""ClusterSTM pretraining: teacher -> cluster mask -> student on the visible tokens -> VTC, VTM,
MLM and MRM; its unmasked variant (FLIP's unmasked tuning); and the retrieval prediction
functions every task with a matching head shares.

Retrieval fine-tuning ('retrieval_ft') is this task with a config that keeps every token and
has no teacher (tasks/__init__.py), so what is fine-tuned is what was pretrained.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from clusterstm_jax import losses
from clusterstm_jax.data.teacher_cache import FIELDS as CACHE_FIELDS
from clusterstm_jax.masking import stats as mask_stats
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import common as models_common
from clusterstm_jax.tasks import base


def make_model(config, vocab_size: int) -> clusterstm_lib.ClusterSTM:
  return clusterstm_lib.ClusterSTM(config=config.model, vocab_size=vocab_size,
                                   num_frames=config.data.num_frames,
                                   image_size=config.data.image_size,
                                   max_text_len=config.data.max_text_len,
                                   **models_common.policy(config))


def mlm_special_ids(text: base.TextSpec) -> tuple[int, ...]:
  """The ids MLM never selects. UMT (ALBEF's `mask`) excludes only pad and [CLS]: [SEP]/EOS is
  selected like any word (and predicted)."""
  return (text.pad_id, text.cls_id)


def needs_teacher(config) -> bool:
  """The student needs teacher features for cluster masking and for the MRM target, unless
  they come from an offline teacher cache (config.teacher.cache) in the batch."""
  if uses_cache(config):
    return False
  return (config.mask.strategy in masking.CLUSTER_STRATEGIES
          or config.loss_weights.get('mrm', 0.0) > 0)


def uses_cache(config) -> bool:
  return bool('teacher' in config and config.teacher.get('cache'))


def teacher_signals(config, teacher, teacher_params, video, teacher_ids, mask_rng, grid_thw, *,
                    mask_config=None) -> dict:
  """What the frozen teacher gives one batch (video in [-1, 1]; `teacher_ids`: the captions in
  the teacher's own ids, the batch's `teacher_text`): the kept-token indices of the mask
  [B,T,N_c] (`mask_config`, default config.mask), and with MRM its per-token relevance target
  [B,T,N] (before the per-clip standardisation) and its text feature [B,D]. The live step calls
  this; the offline pass (tools/teacher_cache.py) calls it once and stores the result
  (data/teacher_cache.FIELDS), which the cached step reads from the batch instead."""
  b, t = video.shape[:2]
  _, h, w = grid_thw
  features = None
  if teacher is not None:
    features = jax.lax.stop_gradient(teacher.frame_tokens(teacher_params, video))
  mask = masking.mask_from_config(mask_config or config.mask, mask_rng, (b, t, h * w), features)
  out = {'keep_idx': mask.keep_idx}
  if config.loss_weights.get('mrm', 0.0) > 0:
    pooled = teacher.relevance_tokens(teacher_params, features, (h, w), config.mrm.window)
    # The teacher's text tower reads its own ids (its tokenizer), never the student's.
    text_emb = jax.lax.stop_gradient(teacher.text_embedding(teacher_params, teacher_ids))
    out['mrm_target'] = losses.relevance_target(pooled, text_emb, in_batch=config.mrm.in_batch)
    out['text_emb'] = text_emb
  return out


def retrieval_predict_fns(model) -> dict:
  """The retrieval evaluator's functions for any model with the student's towers and VTM head.

    embed_video(params, video uint8) -> normalised per-frame features [B,T,E]
    embed_text(params, ids) -> normalised [B,E]
    encode(params, video uint8, ids) -> (video_feat, video tokens, text_feat, text hidden)
    encode_text(params, ids) -> (text_feat, text hidden) (texts without their video)
    match(params, hidden, ids, tokens) -> matching-head log-odds [N] of N (text, video) pairs
  """
  def embed_video(params, video):
    return model.apply({'params': params}, base.normalize_video(video), None,
                       method=model.encode_video)[0]

  def embed_text(params, ids):
    return model.apply({'params': params}, ids, method=model.encode_text)[0]

  def encode(params, video, ids):
    apply = functools.partial(model.apply, {'params': params})
    video_feat, tokens = apply(base.normalize_video(video), None, method=model.encode_video)
    text_feat, hidden = apply(ids, method=model.encode_text)
    return video_feat, tokens, text_feat, hidden

  def encode_text(params, ids):
    return model.apply({'params': params}, ids, method=model.encode_text)

  def match(params, hidden, ids, tokens):
    apply = functools.partial(model.apply, {'params': params})
    logits = apply(apply(hidden, ids, tokens, method=model.fuse), method=model.vtm_logits)
    return logits[:, 1] - logits[:, 0]  # log-odds of a match (class 1)

  return dict(embed_video=embed_video, embed_text=embed_text, encode=encode,
              encode_text=encode_text, match=match)


def build(config, text: base.TextSpec, teacher=None, *, name: str = 'clusterstm',
          takes_images: bool = True) -> base.Task:
  model = make_model(config, text.vocab_size)
  t, h, w = base.grid(config)  # t: the init inputs' frames; the loss takes T from each batch
  n = h * w
  patch = base.patch_size(config)
  weights = config.loss_weights
  use = {k: float(weights.get(k, 0.0)) > 0 for k in ('vtc', 'vtm', 'mlm', 'mrm')}
  # UMT's hard negatives unless the config says otherwise (fine-tuning configs have no `vtm`).
  vtm_negatives = config.vtm.negatives if 'vtm' in config else 'hard'
  hard_fraction = {'hard': 1.0, 'random': 0.0}.get(vtm_negatives)
  if vtm_negatives == 'mixed':
    hard_fraction = float(config.vtm.get('hard_fraction', 0.5))
  if use['vtm'] and (hard_fraction is None or not 0.0 <= hard_fraction <= 1.0):
    raise ValueError(f"vtm.negatives must be 'hard', 'random' or 'mixed' (with vtm.hard_fraction "
                     f"in [0, 1]), got {vtm_negatives!r}")
  if use['mrm'] and not config.model.decoder.out_dim:
    raise ValueError('loss_weights.mrm > 0 needs model.decoder.out_dim (the teacher width)')
  cached = uses_cache(config)  # the batch carries CACHE_FIELDS; no teacher in the step

  # The image stream's mask: images.mask_ratio where set (UMT: 0.5 for images), else the video's.
  image_ratio = config.images.get('mask_ratio', -1.0) if 'images' in config else -1.0
  image_mask = config.mask
  if image_ratio >= 0:
    image_mask = config.mask.copy_and_resolve_references()
    with image_mask.unlocked():
      image_mask.ratio = image_ratio

  def loss_fn(params, batch, rng, teacher_params, *, unmasked=False, image=False):
    mask_rng, dropout_rng, vtm_rng, mlm_rng = jax.random.split(rng, 4)
    video = base.normalize_video(batch['video'])
    ids = batch['text']
    # T from the batch (static under jit): config.data.num_frames for videos, 1 for the image
    # stream's batches, which then get the T = 1 position tables, masking and decoder grid.
    b, t = video.shape[:2]
    apply = functools.partial(model.apply, {'params': params}, rngs={'dropout': dropout_rng})
    use_mrm = use['mrm'] and not unmasked

    # The teacher's mask and MRM target: from the batch (offline cache) or the live teacher
    # (all tokens of every frame, no gradient); the same fields either way.
    mask = signals = None
    if not unmasked:
      if cached:
        signals = {k: batch[k] for k in CACHE_FIELDS}
      else:
        if use['mrm'] and 'teacher_text' not in batch:
          raise ValueError("MRM needs the batch's 'teacher_text' (the caption in the teacher's "
                           "own ids): make_train_loader(teacher_text=teacher.text_stream)")
        signals = teacher_signals(config, teacher, teacher_params, video,
                                  batch.get('teacher_text'), mask_rng, (t, h, w),
                                  mask_config=image_mask if image else None)
      mask = masking.from_keep_idx(signals['keep_idx'], n)

    # Student on the visible tokens only (every token during unmasked tuning).
    keep_idx = None if unmasked else mask.keep_idx
    video_feat, tokens = apply(video, keep_idx, train=True, method=model.encode_video)
    text_feat, hidden = apply(ids, train=True, method=model.encode_text)
    temperature = apply(method=model.temperature)
    sim = losses.video_text_similarity(video_feat, text_feat)
    index = batch['index']
    extra = {}  # metrics beside the loss terms
    terms = {'vtc': losses.vtc_loss(sim, temperature, index)}  # positives: the same video

    if use['vtm']:
      # Pairs [positive; negative video for each text; negative text for each video].
      # Never a negative: the same video (UMT) or the very same caption of another clip.
      same_text = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
      # 'hard' (UMT): drawn from softmax(sim / temperature); 'random': uniformly; 'mixed':
      # each negative hard with probability vtm.hard_fraction, else uniform.
      neg_text, neg_video = losses.sample_hard_negatives(
          sim / temperature, vtm_rng, positive_mask=losses.same_index(index) | same_text,
          hard_fraction=hard_fraction)
      hid3 = jnp.concatenate([hidden, hidden, hidden[neg_text]])
      ids3 = jnp.concatenate([ids, ids, ids[neg_text]])
      tok3 = jnp.concatenate([tokens, tokens[neg_video], tokens])
      fused = apply(hid3, ids3, tok3, train=True, method=model.fuse)
      logits = apply(fused, method=model.vtm_logits)
      terms['vtm'] = losses.vtm_loss(logits)
    if use['mlm']:
      masked_ids, targets, mlm_w = losses.mlm_mask(
          ids, mlm_rng, mask_id=text.mask_id, vocab_size=text.vocab_size,
          special_ids=mlm_special_ids(text))
      _, masked_hidden = apply(masked_ids, train=True, method=model.encode_text)
      fused = apply(masked_hidden, masked_ids, tokens, train=True, method=model.fuse)
      terms['mlm'] = losses.mlm_loss(apply(fused, method=model.mlm_logits), targets, mlm_w)
    if use_mrm:
      in_batch = config.mrm.in_batch
      target, text_emb = signals['mrm_target'], signals['text_emb']
      decoded = apply(tokens, mask.keep_idx, (t, h, w), train=True, method=model.decode)
      std = config.mrm.get('standardize', False)  # configs from before it: raw cosines
      student = losses.student_relevance(decoded, text_emb, in_batch=in_batch,
                                         unit_tokens=not std)
      extra['mrm/target_std'] = jnp.mean(jnp.std(target, axis=(1, 2)))  # within a clip
      if std:  # the target standardised per clip; the student's unbounded relevance centred
        target = losses.standardize_per_clip(target)
        student = losses.center_per_clip(student)
      terms['mrm'] = losses.mrm_loss(student, target, mask.keep_mask)
      extra['mrm_baseline'] = losses.mrm_baseline(target, mask.keep_mask)

    loss = sum(weights.get(k, 0.0) * v for k, v in terms.items() if use[k] or k == 'vtc')
    metrics = dict(terms, **extra, temperature=temperature)
    if mask is not None:
      token_obj = mask_stats.token_objects(batch['labels'], patch)
      metrics.update({f'mask/{k}': v for k, v in
                      mask_stats.mask_stats(mask.keep_mask, token_obj).items()})
    return loss, metrics

  predict = retrieval_predict_fns(model)
  s, l = config.data.image_size, config.data.max_text_len
  inputs = (jnp.zeros((2, t, s, s, 3), jnp.float32), jnp.zeros((2, l), jnp.int32))
  return base.Task(name=name, model=model, init_inputs=inputs, loss_fn=loss_fn,
                   encode_video=predict['embed_video'], encode_text=predict['embed_text'],
                   unmasked_loss_fn=functools.partial(loss_fn, unmasked=True),
                   image_loss_fn=functools.partial(loss_fn, image=True),
                   dummy_batch=functools.partial(
                       base.video_batch, config,
                       teacher_text_len=teacher.model.text_len if teacher is not None else 0),
                   predict_fns=predict, takes_images=takes_images,
                   project_params=clusterstm_lib.clamp_temperature)
