"""Static-shape autoregressive decoding: greedy search, beam search, and scoring of given
candidate sequences. Model-agnostic, jit-friendly (fixed max_len, lax.while_loop, no KV cache).

The model is a callable `logits_fn(ids int32 [N, L]) -> logits [N, L, V]` that must be causal:
logits[:, t] is the distribution of token t+1 and depends on ids[:, :t+1] only. Every step
re-runs it on the whole fixed-length buffer (positions not yet written hold `pad_id`) and reads
the logits at the current position; at our sizes that is cheaper to get right than a cache.

Row order: whenever several sequences belong to one batch element (beam search with K beams,
K candidate answers), the N = B*K rows are batch-major, row b*K + k. A logits_fn that closes
over per-example context must tile it the same way: `repeat_rows(context, K)`.

Conventions shared by every function here:
  * A sequence is `bos, tokens..., eos, pad...` in a [.., L] buffer (as data/tokenizer.py writes).
  * The decoders never generate `pad_id` (its log-probability is set to -inf; the others are
    NOT renormalised, so a returned score is exactly the model's log-likelihood of the sequence,
    as `sequence_log_likelihood` computes it). A sequence that reaches L without eos is cut.
  * Scores are sums of log-probs of the generated tokens (eos included, bos and pad excluded).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["beam_search", "greedy_decode", "length_penalty", "repeat_rows",
           "sequence_log_likelihood"]

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
_NEG_INF = -jnp.inf


def repeat_rows(x, k: int):
  """[B, ...] -> [B*k, ...], row b*k + j = x[b] (the batch-major order used here); None stays."""
  return None if x is None else jnp.repeat(x, k, axis=0)


def length_penalty(length, alpha: float):
  """GNMT (Wu et al. 2016): ((5 + length) / 6) ** alpha; 1 for alpha = 0 (raw log-prob)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_ids(batch_size: int, max_len: int, bos_id: int, eos_id: int, pad_id: int):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 (bos + at least one token), got {max_len}")
  if len({bos_id, eos_id, pad_id}) != 3:
    raise ValueError(f"bos_id, eos_id and pad_id must be distinct, got {bos_id}, {eos_id}, "
                     f"{pad_id}")


def _start(rows: int, max_len: int, bos_id: int, pad_id: int) -> jnp.ndarray:
  return jnp.full((rows, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)


def _vocab_size(logits_fn: LogitsFn, ids: jnp.ndarray) -> int:
  shape = jax.eval_shape(logits_fn, ids).shape
  if len(shape) != 3 or shape[:2] != ids.shape:
    raise ValueError(f"logits_fn must map ids {ids.shape} to logits [N, L, V], got {shape}")
  return shape[2]


def _next_log_probs(logits_fn: LogitsFn, ids: jnp.ndarray, t, pad_id: int) -> jnp.ndarray:
  """log p(token at position t | ids[:, :t]) [N, V], with pad excluded (-inf)."""
  logits = lax.dynamic_index_in_dim(logits_fn(ids), t - 1, axis=1, keepdims=False)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp.at[:, pad_id].set(_NEG_INF)


def greedy_decode(logits_fn: LogitsFn, batch_size: int, max_len: int, *, bos_id: int,
                  eos_id: int, pad_id: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Argmax decoding -> (ids int32 [B, max_len], scores float32 [B]).

  logits_fn sees [B, max_len]. Rows stop at their first eos (pad after it); the loop stops
  when every row has stopped or the buffer is full. scores = log-likelihood of each row.
  """
  _check_ids(batch_size, max_len, bos_id, eos_id, pad_id)
  ids = _start(batch_size, max_len, bos_id, pad_id)
  _vocab_size(logits_fn, ids)

  def cond(state):
    t, _, done, _ = state
    return (t < max_len) & ~jnp.all(done)

  def body(state):
    t, ids, done, scores = state
    logp = _next_log_probs(logits_fn, ids, t, pad_id)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, pad_id, token)
    scores = scores + jnp.where(done, 0.0, token_logp)
    ids = lax.dynamic_update_index_in_dim(ids, token, t, axis=1)
    return t + 1, ids, done | (token == eos_id), scores

  state = (jnp.int32(1), ids, jnp.zeros((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.float32))
  _, ids, _, scores = lax.while_loop(cond, body, state)
  return ids, scores


def beam_search(logits_fn: LogitsFn, batch_size: int, max_len: int, *, bos_id: int,
                eos_id: int, pad_id: int = 0, beam_size: int = 4,
                alpha: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search -> (best ids int32 [B, max_len], best scores float32 [B]).

  logits_fn sees [B*beam_size, max_len] (batch-major rows). Keeps `beam_size` alive
  hypotheses and the `beam_size` best finished ones per example. Each step takes the top
  2*beam_size extensions of the alive beams; an extension ending in eos (or filling the last
  position) becomes finished only if it ranks among the top beam_size of them, i.e. only if it
  would have survived in a plain beam (as Hugging Face's BeamSearchScorer), so beam_size=1 with
  alpha=0 is exactly greedy decoding. The alive beams are refilled from the best non-ending
  extensions.

  Ranking of finished hypotheses: score = log-likelihood / length_penalty(n, alpha), GNMT
  style, n = number of generated tokens including eos. alpha = 0 ranks by raw log-likelihood
  (favours short outputs); alpha ~0.6 is the usual MT/captioning setting. The returned score
  is this penalised value. An example stops early once its worst finished score is at least
  the best score any alive beam could still reach (log-probs only decrease, the penalty only
  grows), so early stopping never changes the result.
  """
  _check_ids(batch_size, max_len, bos_id, eos_id, pad_id)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  if alpha < 0:
    raise ValueError(f"length penalty alpha must be >= 0, got {alpha}")
  b, k, length = batch_size, beam_size, max_len
  alive = _start(b * k, length, bos_id, pad_id)
  vocab = _vocab_size(logits_fn, alive)
  alive = alive.reshape(b, k, length)
  num_cand = min(2 * k, k * vocab)
  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  alive_logp = jnp.full((b, k), _NEG_INF).at[:, 0].set(0.0)
  fin, fin_scores = alive, jnp.full((b, k), _NEG_INF)
  max_penalty = length_penalty(length - 1, alpha)

  def gather(seqs, idx):  # seqs [B,S,L], idx [B,R] -> [B,R,L]
    return jnp.take_along_axis(seqs, idx[..., None], axis=1)

  def cond(state):
    t, _, alive_logp, _, fin_scores = state
    # Worst kept finished >= best reachable alive score: nothing can change any more.
    done = jnp.min(fin_scores, axis=1) >= jnp.max(alive_logp, axis=1) / max_penalty
    return (t < length) & ~jnp.all(done)

  def body(state):
    t, alive, alive_logp, fin, fin_scores = state
    logp = _next_log_probs(logits_fn, alive.reshape(b * k, length), t, pad_id)
    cand = (alive_logp[..., None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = lax.top_k(cand, num_cand)  # [B, C], best first
    token = (top_idx % vocab).astype(jnp.int32)
    seqs = gather(alive, top_idx // vocab)
    seqs = lax.dynamic_update_index_in_dim(seqs, token, t, axis=2)
    ends = (token == eos_id) | (t == length - 1)

    new_alive_logp, pick = lax.top_k(jnp.where(ends, _NEG_INF, top_logp), k)
    new_alive = gather(seqs, pick)

    in_beam = jnp.arange(num_cand) < k
    new_fin = jnp.where(ends & in_beam, top_logp / length_penalty(t, alpha), _NEG_INF)
    fin_scores, pick = lax.top_k(jnp.concatenate([fin_scores, new_fin], axis=1), k)
    fin = gather(jnp.concatenate([fin, seqs], axis=1), pick)
    return t + 1, new_alive, new_alive_logp, fin, fin_scores

  state = (jnp.int32(1), alive, alive_logp, fin, fin_scores)
  _, _, _, fin, fin_scores = lax.while_loop(cond, body, state)
  return fin[:, 0], fin_scores[:, 0]


def sequence_log_likelihood(logits_fn: LogitsFn, candidate_ids: jnp.ndarray,
                            pad_id: int = 0) -> jnp.ndarray:
  """Sum of log p(ids[t] | ids[:t]) over t >= 1 with ids[t] != pad -> float32 [B, K].

  candidate_ids int [B, K, L] (each `bos, tokens, eos, pad...`); logits_fn sees [B*K, L],
  batch-major. One teacher-forced pass, full-vocabulary softmax (pad not excluded).
  """
  if candidate_ids.ndim != 3:
    raise ValueError(f"candidate_ids must be [B, K, L], got shape {candidate_ids.shape}")
  b, k, length = candidate_ids.shape
  if length < 2:
    raise ValueError(f"candidates need length >= 2 (bos + a token), got {length}")
  ids = jnp.asarray(candidate_ids, jnp.int32).reshape(b * k, length)
  logits = logits_fn(ids)
  if logits.ndim != 3 or logits.shape[:2] != ids.shape:
    raise ValueError(f"logits_fn must map ids {ids.shape} to logits [N, L, V], got "
                     f"{logits.shape}")
  logits = logits[:, :-1].astype(jnp.float32)
  targets = ids[:, 1:]
  # log_softmax gathered at the target, without a second [N, L, V] array.
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(jnp.where(targets != pad_id, token_logp, 0.0), axis=-1).reshape(b, k)
