"""VideoQA data: the answer list open-ended QA ranks, and QA batches.

Real datasets (MSRVTT-QA, MSVD-QA) follow UMT and VindLU: every (video, question) pair is an
example (data/examples.py 'questions'; one question per batch row), and the answer list is the
`qa.num_answers` most frequent answers of the training split (ties: alphabetical), 1,500 on
MSRVTT-QA and 1,000 on MSVD-QA by default as in those papers; a test question whose answer is
not in the list is scored wrong. Shapes keeps its own list (shapes.ANSWER_VOCAB) and its clip
batches, which hold every question of a clip (up to `qa.max_questions`, empty slots masked) so
the video is encoded once per clip. Either way a batch is
  video uint8 [b,T,H,W,3], questions int32 [b,Q,Lq], answers int32 [b,Q,La] (bos answer eos,
  all pad in empty slots), answer_idx int32 [b,Q] (index into the answer list, -1 if absent),
  qtype int32 [b,Q] (index into type_names: shapes the answer's kind, real data the question
  word), qa_mask bool [b,Q] (a real question), index int32 [b] (+ valid [b] from the eval
  loader), with Q = 1 on real data.
"""
from __future__ import annotations

import collections
import functools

import numpy as np

from clusterstm_jax.data import pipeline
from clusterstm_jax.data import shapes
from clusterstm_jax.errors import UserError

# The answer-list size of the literature (UMT, VindLU; from Xu et al. 2017's MSRVTT-QA/MSVD-QA).
DEFAULT_NUM_ANSWERS = {'msrvtt': 1500, 'msvd': 1000}
QUESTION_WORDS = ('what', 'who', 'how', 'when', 'where')  # MSRVTT-QA / MSVD-QA question types
_SHAPES_KINDS = (('colour', shapes.COLOURS), ('shape', shapes.SHAPES), ('size', shapes.SIZES),
                 ('motion', shapes.MOTIONS), ('count', shapes.COUNT_WORDS))


def examples_kind(config) -> str:
  """'questions' (a (video, question) pair per row) on real data; shapes: 'records' (clips)."""
  return 'records' if config.data.name == 'shapes' else 'questions'


def max_questions(config) -> int:
  return config.qa.max_questions if examples_kind(config) == 'records' else 1


def num_answers(config) -> int:
  k = config.qa.get('num_answers', 0)
  if k > 0:
    return k
  if config.data.name not in DEFAULT_NUM_ANSWERS:
    raise UserError(f'no default answer-list size for {config.data.name!r}: set '
                    'config.qa.num_answers')
  return DEFAULT_NUM_ANSWERS[config.data.name]


@functools.lru_cache(maxsize=8)
def _top_answers(name: str, data_dir: str, builder_config: str, split: str, k: int):
  data = pipeline.default_data_config()
  data.update(name=name, data_dir=data_dir, builder_config=builder_config)
  source = pipeline.get_source(data, split)
  counts = collections.Counter(as_text(a) for i in range(len(source))
                               for a in source[i]['answers'])
  return tuple(a for a, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:k])


def answer_list(config) -> tuple[str, ...]:
  """The answer list open-ended QA ranks: shapes.ANSWER_VOCAB on shapes, else the
  num_answers(config) most frequent answers of the training split."""
  d = config.data
  if d.name == 'shapes':
    return shapes.ANSWER_VOCAB
  return _top_answers(d.name, d.data_dir, d.builder_config, d.train_split, num_answers(config))


def type_names(config) -> list[str]:
  """Names of the qtype values (per-type accuracy); the last is 'other'."""
  if config.data.name == 'shapes':
    return [name for name, _ in _SHAPES_KINDS] + ['other']
  return list(QUESTION_WORDS) + ['other']


def _shapes_type(answer: str) -> int:
  return next((i for i, (_, words) in enumerate(_SHAPES_KINDS) if answer in words),
              len(_SHAPES_KINDS))


def _question_type(question: str) -> int:
  words = question.lower().split()
  first = words[0] if words else ''
  return QUESTION_WORDS.index(first) if first in QUESTION_WORDS else len(QUESTION_WORDS)


def answer_table(tokenizer, config, answer_len: int) -> np.ndarray:
  """int32 [A, answer_len]: bos answer eos pad... for every answer of the list."""
  answers = answer_list(config)
  ids = tokenizer.encode_batch(answers, answer_len)
  cut = np.flatnonzero(ids[:, -1] != tokenizer.pad_id)
  if cut.size:
    need = max(len(tokenizer.encode_batch([a], 512)[0].nonzero()[0]) for a in answers) + 1
    raise UserError(f'qa.answer_len={answer_len} cuts the answer {answers[cut[0]]!r} of the '
                    f'answer list; the list needs qa.answer_len={need}')
  return ids


def as_text(x) -> str:
  """A stored text field (bytes) as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def decode_qa_example(ex, *, tokenizer, num_frames: int, image_size: int, max_text_len: int,
                      rng, answers: tuple[str, ...], max_questions: int, question_len: int,
                      answer_len: int, type_of: str = 'answer') -> dict[str, np.ndarray]:
  """One stored clip -> the QA fields of the module docstring (video as the pipeline decodes it).

  A clip with more than max_questions questions: training takes a random subset from `rng`,
  evaluation (rng None) refuses, so that accuracy is never over a silently cut set.
  type_of: 'answer' (shapes: the answer's kind) or 'question' (its first word) gives qtype.
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
  qtype = np.full((max_questions,), -1, np.int32)
  if n:
    qtype[:n] = ([_shapes_type(a) for a in gold] if type_of == 'answer'
                 else [_question_type(q) for q in questions])
    q_ids[:n] = tokenizer.encode_batch(questions, question_len)
    a_ids[:n] = tokenizer.encode_batch(gold, answer_len)
    answer_idx[:n] = [index.get(a, -1) for a in gold]
  return {'video': base['video'], 'questions': q_ids, 'answers': a_ids,
          'answer_idx': answer_idx, 'qtype': qtype, 'qa_mask': np.arange(max_questions) < n,
          'index': base['index']}


class _QADecode:
  """decode_qa_example bound to config.qa; the answer list is made on first use (reading the
  training split), not when a model is built."""

  def __init__(self, config):
    self._config, self._kwargs = config.copy_and_resolve_references(), None

  def __call__(self, ex, **kwargs):
    if self._kwargs is None:
      c = self._config
      self._kwargs = dict(answers=answer_list(c), max_questions=max_questions(c),
                          question_len=c.qa.question_len, answer_len=c.qa.answer_len,
                          type_of='answer' if c.data.name == 'shapes' else 'question')
    return decode_qa_example(ex, **kwargs, **self._kwargs)


def qa_decoder(config):
  """decode_qa_example bound to config.qa and the answer list (for make_*_loader(decode=))."""
  return _QADecode(config)


def qa_batch(config, batch_size: int, *, image: bool = False) -> dict[str, np.ndarray]:
  """A QA batch of the loader's shapes and dtypes (init and compilation)."""
  if image:
    raise ValueError('VideoQA has no image stream')
  t, s, qa = config.data.num_frames, config.data.image_size, config.qa
  q = max_questions(config)
  return dict(video=np.zeros((batch_size, t, s, s, 3), np.uint8),
              questions=np.zeros((batch_size, q, qa.question_len), np.int32),
              answers=np.zeros((batch_size, q, qa.answer_len), np.int32),
              answer_idx=np.zeros((batch_size, q), np.int32),
              qtype=np.zeros((batch_size, q), np.int32),
              qa_mask=np.zeros((batch_size, q), bool),
              index=np.zeros((batch_size,), np.int32))
