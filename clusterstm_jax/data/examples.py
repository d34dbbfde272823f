"""What one training (or QA evaluation) example is, over a split's stored records.

A record is one video with every caption (`captions`) and, on QA builds, every question. The
examples over it are:
  'captions'   every (video, caption) pair (config.data.captions = 'pairs', the default), or
               one example per video whose caption is drawn at each visit ('sample');
               videos without a caption are left out and counted;
  'questions'  every (video, question) pair: QA batches of one question per row (UMT, VindLU);
  'records'    the records themselves (shapes, whose clips hold one caption; QA on shapes).
Datasets with one text per record (shapes, paragraph datasets, WebVid, CC3M) are their own
examples. The wrappers are
random-access sources (len, [i]) in record order, so grain shuffles and resumes them as it does
the records; each example keeps its record's `id`.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from clusterstm_jax.errors import UserError

KINDS = ('records', 'captions', 'questions')
CAPTION_MODES = ('pairs', 'sample')
_PICK = '_pick_caption'  # marks a record whose caption is drawn per visit (pick_caption)


class _Expanded:
  """Source of the (record, k) pairs of the given per-record counts, in record order."""

  def __init__(self, source, counts: np.ndarray, field: str):
    self._source, self._field = source, field
    self._records = np.repeat(np.arange(len(counts)), counts)
    self._k = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, int)

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:  # grain checks a resumed iterator's source by its repr
    return f'_Expanded({self._source!r}, field={self._field!r}, examples={len(self)})'

  def __getitem__(self, j: int) -> dict:
    ex = dict(self._source[int(self._records[j])])
    k = int(self._k[j])
    if self._field == 'captions':
      ex['caption'] = ex['captions'][k]
    else:
      for key in ('questions', 'answers', 'question_ids', 'question_types'):
        if key in ex:
          ex[key] = ex[key][k:k + 1]
    return ex


class _Sampled:
  """Source of the records with at least one caption; the caption is drawn at decode time."""

  def __init__(self, source, keep: np.ndarray):
    self._source, self._keep = source, keep

  def __len__(self) -> int:
    return len(self._keep)

  def __repr__(self) -> str:
    return f'_Sampled({self._source!r}, videos={len(self)})'

  def __getitem__(self, j: int) -> dict:
    return {**self._source[int(self._keep[j])], _PICK: True}


def pick_caption(ex: dict, rng: np.random.Generator | None) -> dict:
  """A 'sample' record with one of its captions drawn from `rng`; other examples unchanged."""
  if not ex.pop(_PICK, False):
    return ex
  captions = ex['captions']
  ex['caption'] = captions[0] if rng is None else captions[int(rng.integers(len(captions)))]
  return ex


def counts(source, field: str) -> np.ndarray:
  """Per record, the length of `field` (one read pass over the split)."""
  return np.array([len(source[i][field]) for i in range(len(source))], np.int64)


def examples(source, kind: str, *, multi_caption: bool = True, captions: str = 'pairs',
             what: str = 'split', announce: bool = True):
  """The examples of kind `kind` over `source` (see the module docstring); logs and prints
  how many there are and how many records had none. `multi_caption` False (datasets whose
  record holds one text: shapes, paragraphs, WebVid, CC3M) makes 'captions' the records,
  without the read pass that counts captions."""
  if kind not in KINDS:
    raise ValueError(f'unknown example kind {kind!r}; expected one of {KINDS}')
  if captions not in CAPTION_MODES:
    raise UserError(f'config.data.captions={captions!r}; expected one of {CAPTION_MODES}')
  if kind == 'records' or len(source) == 0 or (kind == 'captions' and not multi_caption):
    return source
  field = 'captions' if kind == 'captions' else 'questions'
  if field not in source[0]:
    if kind == 'questions':
      raise UserError(f'{what} has no questions: VideoQA needs a QA build (e.g. msrvtt qa)')
    return source  # one caption per record (shapes)
  n = counts(source, field)
  empty = int(np.sum(n == 0))
  if kind == 'captions' and captions == 'sample':
    out = _Sampled(source, np.flatnonzero(n > 0))
    line = f'{what}: {len(out)} videos, a caption drawn per visit from {int(n.sum())}'
  else:
    out = _Expanded(source, n, field)
    line = f'{what}: {len(out)} (video, {field[:-1]}) pairs from {len(source) - empty} videos'
  if empty:
    line += f'; {empty} videos without a {field[:-1]} left out'
  logging.info(line)
  if announce:
    print(line)
  if len(out) == 0:
    raise UserError(f'{what} has no {field}')
  return out
