"""Captioning metrics: BLEU-4, ROUGE-L and CIDEr(-D) through pycocoevalcap's scorers.

This file owns caption tokenisation and the call into pycocoevalcap. pycocoevalcap's
PTBTokenizer, METEOR and SPICE run Java, so we never import them: only the pure-python scorer
modules (bleu, rouge, cider) are imported, and tokenisation is our own `tokenize`.

METEOR is NOT reported: its only reference implementation (meteor-1.5.jar) needs Java. Papers
report BLEU-4, METEOR, ROUGE-L and CIDEr; compare our three with theirs, knowing their
tokenisation (PTB) differs slightly from ours, so absolute values may differ by a fraction
of a point.
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

from clusterstm_jax.errors import UserError

_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> str:
  """Lowercase, drop punctuation, collapse whitespace; returns tokens joined by single spaces.

  Apostrophes are deleted (so "man's" -> "mans", "don't" -> "dont": one token, as one word);
  every other punctuation character becomes a space ("t-shirt" -> "t shirt").
  """
  text = _APOSTROPHES.sub("", text.lower())
  return " ".join(_PUNCT.sub(" ", text).split())


def _scorers():
  """pycocoevalcap's scorer modules only (its package has no __init__ that would pull in the
  Java-based parts); imported on use: pycocoevalcap is the [caption] extra."""
  try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
  except ImportError as e:
    raise UserError("captioning metrics need the [caption] extra (pycocoevalcap): pip install "
                    "'clusterstm_jax[caption]'") from e
  return Bleu, Rouge, Cider


def _check(predictions: Mapping[Hashable, str],
           references: Mapping[Hashable, Sequence[str]]) -> list:
  if not predictions:
    raise ValueError("predictions is empty")
  pred_ids, ref_ids = set(predictions), set(references)
  if pred_ids != ref_ids:
    extra, missing = pred_ids - ref_ids, ref_ids - pred_ids
    raise ValueError(f"predictions and references have different ids: {len(extra)} only in "
                     f"predictions (e.g. {next(iter(extra), None)!r}), {len(missing)} only "
                     f"in references (e.g. {next(iter(missing), None)!r})")
  ids = list(predictions)
  for i in ids:
    if not isinstance(predictions[i], str):
      raise ValueError(f"prediction for id {i!r} must be a str, got "
                       f"{type(predictions[i]).__name__}")
    refs = references[i]
    if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"references for id {i!r} must be a non-empty list of str")
  return ids


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
  """Corpus BLEU-4, ROUGE-L and CIDEr of predicted captions, each scaled x100 as papers report.

  Args:
    predictions: {id: predicted caption}.
    references: {id: [reference captions]}; the same ids as `predictions`.
  Returns:
    {'BLEU-4', 'ROUGE-L', 'CIDEr'} as Python floats (x100). BLEU-4 is corpus-level with the
    'closest' reference length; ROUGE-L (beta 1.2) is averaged over ids; CIDEr is CIDEr-D
    (n = 1..4, sigma 6, clipping) whose idf comes from the references of THIS set, so it
    depends on the whole evaluated set and is 0 for a single id. METEOR is not computed
    (needs Java; see the module docstring).
  """
  ids = _check(predictions, references)
  # Keys are renumbered so that arbitrary hashable ids reach pycocoevalcap's dicts unchanged.
  res = {n: [tokenize(predictions[i])] for n, i in enumerate(ids)}
  gts = {n: [tokenize(r) for r in references[i]] for n, i in enumerate(ids)}
  Bleu, Rouge, Cider = _scorers()  # pylint: disable=invalid-name
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  cider, _ = Cider().compute_score(gts, res)
  return {"BLEU-4": 100.0 * float(bleu[3]),
          "ROUGE-L": 100.0 * float(rouge),
          "CIDEr": 100.0 * float(cider)}
