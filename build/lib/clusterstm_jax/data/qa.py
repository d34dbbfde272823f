"""VideoQA data: the answer list open-ended QA ranks, and QA batches.

QA batches hold every question of a clip (up to `qa.max_questions`, empty slots masked), so the
video is encoded once per clip and both training and evaluation see the same batch layout:
  video uint8 [b,T,H,W,3], questions int32 [b,Q,Lq], answers int32 [b,Q,La] (bos answer eos,
  all pad in empty slots), answer_idx int32 [b,Q] (index into the answer list, -1 if absent),
  qa_mask bool [b,Q] (a real question), index int32 [b] (+ valid [b] from the eval loader).
"""
from __future__ import annotations

import functools

import numpy as np

from clusterstm_jax.data import pipeline
from clusterstm_jax.data import shapes
from clusterstm_jax.errors import UserError


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


def qa_decoder(config):
  """decode_qa_example bound to config.qa and the answer list (for make_*_loader(decode=))."""
  qa = config.qa
  return functools.partial(decode_qa_example, answers=answer_list(config.data),
                           max_questions=qa.max_questions, question_len=qa.question_len,
                           answer_len=qa.answer_len)


def qa_batch(config, batch_size: int, *, image: bool = False) -> dict[str, np.ndarray]:
  """A QA batch of the loader's shapes and dtypes (init and compilation)."""
  if image:
    raise ValueError('VideoQA has no image stream')
  t, s, qa = config.data.num_frames, config.data.image_size, config.qa
  q = qa.max_questions
  return dict(video=np.zeros((batch_size, t, s, s, 3), np.uint8),
              questions=np.zeros((batch_size, q, qa.question_len), np.int32),
              answers=np.zeros((batch_size, q, qa.answer_len), np.int32),
              answer_idx=np.zeros((batch_size, q), np.int32),
              qa_mask=np.zeros((batch_size, q), bool),
              index=np.zeros((batch_size,), np.int32))
