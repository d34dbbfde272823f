"""Downstream tasks on a pretrained ClusterSTM student: VideoQA and captioning.

  'qa'       the student + an answer decoder (TextDecoder) cross-attending to the fused
             question+video features (UMT's VideoQA); teacher-forced loss on the answer;
  'caption'  the student + a caption decoder cross-attending to the video tokens;
             teacher-forced loss on the caption.
(Retrieval fine-tuning is the pretraining task on every token: tasks/__init__.py.)
The decoder models keep the student's parameter names at the top level and add `text_decoder`,
so `config.init` (exports.load_params_into) loads a pretraining export by name and the decoder
starts from its initialisation. QA batches: data/qa.py; captioning trains on the pipeline's own
batches (the caption is `text`).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from clusterstm_jax import losses
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import common
from clusterstm_jax.models import text as text_lib
from clusterstm_jax.models import text_decoder as text_decoder_lib
from clusterstm_jax.tasks import base
from clusterstm_jax.tasks import pretrain


class DecoderModel(clusterstm_lib.ClusterSTM):
  """The student plus a causal `text_decoder` of length `decoder_len`, whose context is the
  fused question+video features ('qa') or the video tokens ('caption')."""
  task: str = 'caption'
  decoder_len: int = 32

  def setup(self):
    super().setup()
    d = self.config.text_decoder
    self.text_decoder = text_decoder_lib.TextDecoder(
        vocab_size=self.vocab_size, max_len=self.decoder_len, variant=d.variant,
        depth=d.get('depth'), dropout=self.config.get('dropout', 0.0), dtype=self.dtype,
        remat=self.remat, vocab_multiple=self.config.get('vocab_multiple', 1))

  def qa_context(self, video, questions, *, train=False):
    """video [B,T,H,W,3] normalised, questions [B,Q,L] -> (fused [B*Q,L,D], mask [B*Q,L]).

    Each clip is encoded once; its tokens are repeated for its Q questions (row b*Q + q).
    """
    b, q, length = questions.shape
    _, tokens = self.encode_video(video, train=train)
    ids = questions.reshape(b * q, length)
    _, hidden = self.encode_text(ids, train=train)
    fused = self.fuse(hidden, ids, jnp.repeat(tokens, q, axis=0), train=train)
    return fused, text_lib.padding_mask(ids)

  def caption_context(self, video, *, train=False):
    """video [B,T,H,W,3] normalised -> every video token [B, T*N, D]."""
    _, tokens = self.encode_video(video, train=train)
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])

  def decode_text(self, ids, context, context_mask=None, *, train=False):
    """Decoder logits [N,L,V] of ids [N,L] given the context (see TextDecoder: V is padded as
    the student's table, config.model.vocab_multiple; the padded ids' logits are -inf)."""
    return self.text_decoder(ids, context, context_mask, train=train)  # f32 logits

  def __call__(self, video, ids, decoder_ids, *, train=False):
    out = super().__call__(video, ids, train=train)
    if self.task == 'qa':
      context, mask = self.qa_context(video, ids[:, None], train=train)
    else:
      context, mask = self.caption_context(video, train=train), None
    out['decoder_logits'] = self.decode_text(decoder_ids, context, mask, train=train)
    return out


def decoder_len(config) -> int:
  """Answers for QA, captions (the pipeline's text length) for captioning."""
  return config.qa.answer_len if config.task == 'qa' else config.data.max_text_len


def make_model(config, vocab_size: int) -> DecoderModel:
  return DecoderModel(config=config.model, vocab_size=vocab_size,
                      num_frames=config.data.num_frames, image_size=config.data.image_size,
                      max_text_len=config.data.max_text_len, task=config.task,
                      decoder_len=decoder_len(config), **common.policy(config))


def build(config, text: base.TextSpec) -> base.Task:
  """config.task 'qa' or 'caption'."""
  task = config.task
  model = make_model(config, text.vocab_size)

  def loss_fn(params, batch, rng, teacher_params):
    del teacher_params
    apply = functools.partial(model.apply, {'params': params}, rngs={'dropout': rng})
    video = base.normalize_video(batch['video'])
    if task == 'qa':
      context, mask = apply(video, batch['questions'], train=True, method=model.qa_context)
      targets = batch['answers'].reshape(-1, batch['answers'].shape[-1])  # empty slots: all pad
    else:
      context, mask = apply(video, train=True, method=model.caption_context), None
      targets = batch['text']
    logits = apply(targets, context, mask, train=True, method=model.decode_text)
    loss = losses.lm_loss(logits, targets, text.pad_id)
    return loss, {f'{task}_lm': loss}

  def qa_context(params, video, questions):
    return model.apply({'params': params}, base.normalize_video(video), questions,
                       method=model.qa_context)

  def caption_context(params, video):
    return model.apply({'params': params}, base.normalize_video(video),
                       method=model.caption_context)

  def decode(params, ids, context, context_mask):
    return model.apply({'params': params}, ids, context, context_mask, method=model.decode_text)

  predict = pretrain.retrieval_predict_fns(model)
  predict['decode'] = decode
  if task == 'qa':
    predict['qa_context'] = qa_context
  else:
    predict['caption_context'] = caption_context
  t, s = config.data.num_frames, config.data.image_size
  text_len = config.qa.question_len if task == 'qa' else config.data.max_text_len
  inputs = (jnp.zeros((2, t, s, s, 3), jnp.float32), jnp.zeros((2, text_len), jnp.int32),
            jnp.zeros((2, decoder_len(config)), jnp.int32))
  if task == 'qa':  # QA batches: every question of a clip (data/qa.py)
    dummy, decode_example = functools.partial(qa_data.qa_batch, config), qa_data.qa_decoder(config)
  else:
    dummy, decode_example = functools.partial(base.video_batch, config), pipeline.decode_example
  return base.Task(name=task, model=model, init_inputs=inputs, loss_fn=loss_fn,
                   encode_video=predict['embed_video'], encode_text=predict['embed_text'],
                   dummy_batch=dummy, decode=decode_example, predict_fns=predict)
