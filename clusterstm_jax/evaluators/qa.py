"""VideoQA evaluation: open-ended answers ranked from a fixed answer list (UMT / ALBEF), and
multiple-choice accuracy from retrieval scores. Orchestration only: the model parts come in as
callables, so this file knows nothing about parameters or sharding.

Open-ended QA, for each question (UMT's `rank_answer`):
  1. the answer decoder, fed only bos, gives log p(first token) over the vocabulary;
  2. the k answers of the list whose first token is most probable are kept (`rank_answers`);
  3. each kept answer is re-scored by its full-sequence log-likelihood under the decoder
     (`rescore_answers`, via decoding.sequence_log_likelihood), and the best one is predicted.
Step 3 scores log p(answer tokens + eos | bos, context), each token counted once. (ALBEF/UMT
add the first-token log-prob a second time to a loss that already contains it; we do not.)

The decoder callable is `decoder_fn(ids [N,L], context [N,M,D], context_mask [N,M] | None)
-> logits [N,L,V]` (e.g. a partial of TextDecoder.apply with params bound); the context is the
fused question+video features and context_mask the question's padding mask.
`predict_answers` is jit-friendly (static k, answer list closed over or passed as an array).
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax import decoding
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.evaluators import common

__all__ = ["run", "evaluate", "first_token_log_probs", "multiple_choice_accuracy", "predict_answers",
           "rank_answers", "rescore_answers"]

DecoderFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray | None], jnp.ndarray]


def _check_answer_ids(answer_ids, pad_id: int = 0):
  if answer_ids.ndim != 2 or answer_ids.shape[0] < 1 or answer_ids.shape[1] < 2:
    raise ValueError(f"answer_ids must be [A >= 1, L >= 2] (bos, tokens, eos, pad), got shape "
                     f"{answer_ids.shape}")
  if not isinstance(answer_ids, jax.core.Tracer):  # values are only checkable when concrete
    first = np.asarray(answer_ids)[:, 1]
    if np.any(first == pad_id):
      raise ValueError(f"answer {int(np.flatnonzero(first == pad_id)[0])} of the answer list "
                       f"is empty (pad right after bos)")


def first_token_log_probs(decoder_fn: DecoderFn, context, context_mask, bos_id: int):
  """log p(first answer token | bos, context) -> float32 [B, V] (full-vocabulary softmax)."""
  bos = jnp.full((context.shape[0], 1), bos_id, jnp.int32)
  logits = decoder_fn(bos, context, context_mask)[:, 0]
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def rank_answers(first_token_logprobs, answer_ids, k: int):
  """Top-k answers by the log-prob of their first token -> (indices int32 [B, k'],
  first-token log-probs float32 [B, k']), best first, k' = min(k, A).

  first_token_logprobs [B, V]; answer_ids [A, L] int with answer_ids[:, 0] = bos, so the first
  answer token is answer_ids[:, 1]. Answers sharing a first token tie; ties keep list order.
  k is clipped to the list size so one config works for any answer list.
  """
  if first_token_logprobs.ndim != 2:
    raise ValueError(f"first_token_logprobs must be [B, V], got shape "
                     f"{first_token_logprobs.shape}")
  _check_answer_ids(answer_ids)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  first = jnp.asarray(answer_ids)[:, 1]
  per_answer = jnp.take(jnp.asarray(first_token_logprobs, jnp.float32), first, axis=1)  # [B, A]
  top_logp, top_idx = jax.lax.top_k(per_answer, min(int(k), answer_ids.shape[0]))
  return top_idx.astype(jnp.int32), top_logp


def rescore_answers(decoder_fn: DecoderFn, context, context_mask, answer_ids, top_idx,
                    pad_id: int = 0):
  """Full-sequence log-likelihood of each kept answer -> float32 [B, k].

  top_idx [B, k] indexes answer_ids [A, L]; the decoder sees the B*k candidates at once
  (batch-major, context tiled k times), so memory grows with B*k*L*V.
  """
  k = top_idx.shape[1]
  candidates = jnp.take(jnp.asarray(answer_ids, jnp.int32), top_idx, axis=0)  # [B, k, L]
  ctx, mask = decoding.repeat_rows(context, k), decoding.repeat_rows(context_mask, k)
  return decoding.sequence_log_likelihood(lambda ids: decoder_fn(ids, ctx, mask),
                                          candidates, pad_id)


def predict_answers(decoder_fn: DecoderFn, context, context_mask, answer_ids, *, k: int,
                    bos_id: int, pad_id: int = 0) -> jnp.ndarray:
  """Index into the answer list of the predicted answer of each question -> int32 [B]."""
  _check_answer_ids(answer_ids, pad_id)
  if not isinstance(answer_ids, jax.core.Tracer) and np.any(np.asarray(answer_ids)[:, 0]
                                                            != bos_id):
    raise ValueError(f"every row of answer_ids must start with bos_id {bos_id}")
  first = first_token_log_probs(decoder_fn, context, context_mask, bos_id)
  top_idx, _ = rank_answers(first, answer_ids, k)
  scores = rescore_answers(decoder_fn, context, context_mask, answer_ids, top_idx, pad_id)
  best = jnp.argmax(scores, axis=1)  # ties: the better first-token rank
  return jnp.take_along_axis(top_idx, best[:, None], axis=1)[:, 0]


def multiple_choice_accuracy(scores, correct) -> float:
  """Percent of questions whose correct option scores strictly above every other option.

  scores [B, C] (e.g. video-text retrieval scores of the C options), correct int [B] in
  [0, C). Ties count as wrong (pessimistic, as evaluators/metrics.py ranks ties), so constant
  scores give 0 for C > 1.
  """
  scores, correct = np.asarray(scores, np.float64), np.asarray(correct)
  if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f"scores must be [B >= 1, C >= 1], got shape {scores.shape}")
  if correct.shape != scores.shape[:1] or not np.issubdtype(correct.dtype, np.integer):
    raise ValueError(f"correct must be an integer array of shape {scores.shape[:1]}, got "
                     f"shape {correct.shape} dtype {correct.dtype}")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  if np.any((correct < 0) | (correct >= scores.shape[1])):
    raise ValueError(f"correct holds an option index outside [0, {scores.shape[1]})")
  rows = np.arange(len(correct))
  right = scores[rows, correct]
  others = scores.copy()
  others[rows, correct] = -np.inf
  return float(100.0 * np.mean(right > others.max(axis=1)))


def evaluate(batches: Iterable[dict], predict_fn: Callable[[dict], np.ndarray], *,
             answer_key: str = "answer_idx", valid_key: str = "valid") -> dict[str, float]:
  """Open-ended top-1 accuracy over an eval loader.

  predict_fn(batch) -> predicted answer-list indices [b], one per row of `batch` (e.g. a
  jitted predict_answers after the encoders). batch[answer_key] int [b] is the correct index,
  -1 when the true answer is not in the list (always wrong, as in UMT); rows with
  batch[valid_key] False (loader padding) are skipped when the key is present.
  Returns {'acc': percent, 'num_questions': count}. In multi-process runs each process sees
  its own rows: combine acc * num_questions across processes.
  """
  right = total = 0
  for batch in batches:
    pred = np.asarray(predict_fn(batch)).reshape(-1)
    gold = np.asarray(batch[answer_key]).reshape(-1)
    if pred.shape != gold.shape:
      raise ValueError(f"predict_fn returned {pred.shape[0]} predictions for a batch of "
                       f"{gold.shape[0]} questions")
    valid = np.asarray(batch.get(valid_key, np.ones_like(gold, bool)), bool).reshape(-1)
    right += int(np.sum((pred == gold) & valid))
    total += int(np.sum(valid))
  if total == 0:
    raise ValueError("QA evaluation saw no valid questions")
  return {"acc": 100.0 * right / total, "num_questions": float(total)}


def run(ev, ctx: common.Context):
  """Top-1 accuracy over every question of the split, and per type (shapes: the answer's kind;
  MSRVTT-QA / MSVD-QA: the question word);
  -> (metrics, details={}). Uses predict_fns 'qa_context' and 'decode'."""
  ctx.needs('qa_context', 'decode', what='VideoQA', tasks='qa')
  config, tokenizer, mesh, params = ctx.config, ctx.tokenizer, ctx.mesh, ctx.params
  answers = qa_data.answer_table(tokenizer, config, config.qa.answer_len)
  qa_context, decode = ctx.predict_fns['qa_context'], ctx.predict_fns['decode']

  def predict(params, video, questions):
    context, mask = qa_context(params, video, questions)
    decoder = lambda ids, c, m: decode(params, ids, c, m)
    pred = predict_answers(decoder, context, mask, answers, k=ev.k,
                           bos_id=tokenizer.cls_id, pad_id=tokenizer.pad_id)
    return pred.reshape(questions.shape[:2])

  predict = ctx.jit(predict)
  records = []

  def batches():
    for batch in ctx.loader(ev, examples=qa_data.examples_kind(config)):
      g = {k: common.global_rows(batch[k], mesh)
           for k in ('answer_idx', 'qtype', 'qa_mask', 'valid')}
      yield {'video': batch['video'], 'questions': batch['questions'],
             'answer_idx': g['answer_idx'], 'qtype': g['qtype'],
             'qa_valid': g['qa_mask'] & g['valid'][:, None]}

  def predict_fn(batch):
    arrays = sharding_lib.global_batch(
        {'video': batch['video'], 'questions': batch['questions']}, mesh)
    pred = np.asarray(predict(params, arrays['video'], arrays['questions']))
    records.append((pred.reshape(-1), batch['answer_idx'].reshape(-1),
                    batch['qtype'].reshape(-1), batch['qa_valid'].reshape(-1)))
    return pred

  out = evaluate(batches(), predict_fn, answer_key='answer_idx', valid_key='qa_valid')
  pred, gold, qtype, valid = map(np.concatenate, zip(*records))
  for t, kind in enumerate(qa_data.type_names(config)):
    sel = valid & (qtype == t)
    if sel.any():
      out[f'acc_{kind}'] = float(100.0 * np.mean(pred[sel] == gold[sel]))
  # Accuracy over every question; those whose answer is not in the list count as wrong.
  out['num_out_of_list'] = float(np.sum(valid & (gold < 0)))
  out['num_answers'] = float(len(answers))
  return out, {}
