"""Downstream tasks on a pretrained ClusterSTM student: their models, losses and batches.

`config.task` picks one (step.make_task dispatches here):
  'retrieval_ft'  the pretraining model with its VTC + VTM losses on every token (UMT fine-tunes
                  retrieval without masking or a teacher); the pretraining task itself, run with
                  a config that keeps all tokens, so what is fine-tuned is what was pretrained;
  'qa'            the student + an answer decoder (TextDecoder) cross-attending to the fused
                  question+video features (UMT's VideoQA); teacher-forced loss on the answer;
  'caption'       the student + a caption decoder cross-attending to the video tokens;
                  teacher-forced loss on the caption.
The decoder models keep the student's parameter names at the top level and add `text_decoder`,
so `config.init` (export.load_params_into) loads a pretraining export by name and the decoder
starts from its initialisation.

QA batches hold every question of a clip (up to `qa.max_questions`, empty slots masked), so the
video is encoded once per clip and both training and evaluation see the same batch layout:
  video uint8 [b,T,H,W,3], questions int32 [b,Q,Lq], answers int32 [b,Q,La] (bos answer eos,
  all pad in empty slots), answer_idx int32 [b,Q] (index into the answer list, -1 if absent),
  qa_mask bool [b,Q] (a real question), index int32 [b] (+ valid [b] from the eval loader).
Captioning and retrieval train on the pipeline's own batches (the caption is `text`).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from clusterstm_jax import step as step_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import shapes
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import text as text_lib
from clusterstm_jax.models import text_decoder as text_decoder_lib

TASKS = ('retrieval_ft', 'qa', 'caption')


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
        depth=d.get('depth'), dropout=self.config.get('dropout', 0.0))

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
    """Decoder logits [N,L,V] of ids [N,L] given the context (see TextDecoder)."""
    return self.text_decoder(ids, context, context_mask, train=train)

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
                      decoder_len=decoder_len(config))


def make_task(config, text: step_lib.TextSpec) -> step_lib.Task:
  task = config.task
  if task == 'retrieval_ft':
    if config.mask.strategy in masking.CLUSTER_STRATEGIES or config.loss_weights.get('mrm', 0.0):
      raise UserError("task 'retrieval_ft' trains without a teacher: use a non-cluster "
                      'mask.strategy (ratio 0 keeps every token) and loss_weights.mrm = 0')
    return step_lib._clusterstm_task(config, text, None)  # pylint: disable=protected-access
  if task not in TASKS:
    raise UserError(f"unknown task {task!r}; known: clusterstm, siglip, {', '.join(TASKS)}")
  model = make_model(config, text.vocab_size)

  def loss_fn(params, batch, rng, teacher_params):
    del teacher_params
    apply = functools.partial(model.apply, {'params': params}, rngs={'dropout': rng})
    video = step_lib.normalize_video(batch['video'])
    if task == 'qa':
      context, mask = apply(video, batch['questions'], train=True, method=model.qa_context)
      targets = batch['answers'].reshape(-1, batch['answers'].shape[-1])  # empty slots: all pad
    else:
      context, mask = apply(video, train=True, method=model.caption_context), None
      targets = batch['text']
    logits = apply(targets, context, mask, train=True, method=model.decode_text)
    loss = text_decoder_lib.lm_loss(logits, targets, text.pad_id)
    return loss, {f'{task}_lm': loss}

  def encode_video(params, video):
    return model.apply({'params': params}, step_lib.normalize_video(video), None,
                       method=model.encode_video)[0]

  def encode_text(params, ids):
    return model.apply({'params': params}, ids, method=model.encode_text)[0]

  t, s = config.data.num_frames, config.data.image_size
  text_len = config.qa.question_len if task == 'qa' else config.data.max_text_len
  inputs = (jnp.zeros((2, t, s, s, 3), jnp.float32), jnp.zeros((2, text_len), jnp.int32),
            jnp.zeros((2, decoder_len(config)), jnp.int32))
  return step_lib.Task(model, inputs, loss_fn, encode_video, encode_text)


# --- QA data ---

def answer_list(data_config) -> tuple[str, ...]:
  """The fixed answer list open-ended QA ranks (UMT): shapes.ANSWER_VOCAB on shapes."""
  if data_config.name != 'shapes':
    raise UserError(f'VideoQA is wired for the shapes dataset only, not {data_config.name!r}')
  return shapes.ANSWER_VOCAB


def answer_categories(data_config) -> list[str]:
  """Per answer of answer_list: colour, shape, size, motion or count (per-type accuracy)."""
  groups = (('colour', shapes.COLOURS), ('shape', shapes.SHAPES), ('size', shapes.SIZES),
            ('motion', shapes.MOTIONS), ('count', shapes.COUNT_WORDS))
  return [next(name for name, words in groups if a in words) for a in answer_list(data_config)]


def answer_table(tokenizer, data_config, answer_len: int) -> np.ndarray:
  """int32 [A, answer_len]: bos answer eos pad... for every answer of the list."""
  ids = tokenizer.encode_batch(answer_list(data_config), answer_len)
  cut = np.flatnonzero(ids[:, -1] != tokenizer.pad_id)
  if cut.size:
    raise UserError(f'qa.answer_len={answer_len} cuts the answer '
                    f'{answer_list(data_config)[cut[0]]!r}; raise it')
  return ids


def as_text(x) -> str:
  """A stored text field (bytes) as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def decode_qa_example(ex, *, tokenizer, num_frames: int, image_size: int, max_text_len: int,
                      rng, answers: tuple[str, ...], max_questions: int, question_len: int,
                      answer_len: int) -> dict[str, np.ndarray]:
  """One stored clip -> the QA fields of the module docstring (video as the pipeline decodes it).

  A clip with more than max_questions questions: training takes a random subset from `rng`,
  evaluation (rng None) refuses, so that accuracy is never over a silently cut set.
  """
  base = pipeline.decode_example(ex, tokenizer=tokenizer, num_frames=num_frames,
                                 image_size=image_size, max_text_len=max_text_len, rng=rng)
  questions = [as_text(q) for q in ex['questions']]
  gold = [as_text(a) for a in ex['answers']]
  n = len(questions)
  if n > max_questions:
    if rng is None:
      raise UserError(f'clip {int(ex["id"])} has {n} questions, more than '
                      f'qa.max_questions={max_questions}')
    keep = np.sort(rng.choice(n, max_questions, replace=False))
    questions, gold, n = [questions[i] for i in keep], [gold[i] for i in keep], max_questions
  # Empty slots get a "[CLS] [SEP]" question (no fully masked attention row) and an all-pad
  # answer, which the loss and the evaluation ignore.
  q_ids = np.zeros((max_questions, question_len), np.int32)
  q_ids[:, :2] = tokenizer.cls_id, tokenizer.eos_id
  a_ids = np.zeros((max_questions, answer_len), np.int32)
  index = {a: i for i, a in enumerate(answers)}
  answer_idx = np.full((max_questions,), -1, np.int32)
  if n:
    q_ids[:n] = tokenizer.encode_batch(questions, question_len)
    a_ids[:n] = tokenizer.encode_batch(gold, answer_len)
    answer_idx[:n] = [index.get(a, -1) for a in gold]
  return {'video': base['video'], 'questions': q_ids, 'answers': a_ids,
          'answer_idx': answer_idx, 'qa_mask': np.arange(max_questions) < n,
          'index': base['index']}


def example_decoder(config):
  """The per-example decode of config.task's batches (for pipeline.make_*_loader(decode=))."""
  if config.get('task') != 'qa':
    return pipeline.decode_example
  qa = config.qa
  return functools.partial(decode_qa_example, answers=answer_list(config.data),
                           max_questions=qa.max_questions, question_len=qa.question_len,
                           answer_len=qa.answer_len)


def dummy_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """A QA batch of the loader's shapes and dtypes (init and compilation)."""
  t, s, qa = config.data.num_frames, config.data.image_size, config.qa
  q = qa.max_questions
  return dict(video=np.zeros((batch_size, t, s, s, 3), np.uint8),
              questions=np.zeros((batch_size, q, qa.question_len), np.int32),
              answers=np.zeros((batch_size, q, qa.answer_len), np.int32),
              answer_idx=np.zeros((batch_size, q), np.int32),
              qa_mask=np.zeros((batch_size, q), bool),
              index=np.zeros((batch_size,), np.int32))
