"""Tests of the causal text decoder, greedy/beam decoding, candidate scoring and the QA /
captioning evaluators, at tiny sizes (Pico decoder, hand-made Markov-chain 'models')."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import decoding
from clusterstm_jax import losses
from clusterstm_jax.evaluators import caption_metrics, captioning, qa
from clusterstm_jax.models import text_decoder
from tests import helpers

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)
PAD, BOS, EOS = 0, 1, 2
VOCAB, LEN = 11, 6


@pytest.fixture(scope="module")
def dec():
  """A random Pico decoder (2 layers): (jitted apply, params, context, context_mask,
  decoder_fn(ids, context, context_mask) with the params bound)."""
  model = text_decoder.TextDecoder(VOCAB, LEN, "Pico", depth=2)
  context = jax.random.normal(jax.random.key(1), (3, 4, 24))  # Dc != width: context_proj
  context_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]], bool)
  ids = jnp.asarray([[BOS, 5, 7, 9, EOS, PAD]] * 3, jnp.int32)
  params = nn.unbox(jax.jit(model.init)(KEY, ids, context, context_mask))
  apply = jax.jit(model.apply)

  def decoder_fn(ids, ctx, mask):
    return apply(params, ids, ctx, mask)
  return apply, params, context, context_mask, decoder_fn


def _markov_fn(table):
  """logits_fn of a Markov chain: logits[n, t] = log p(. | ids[n, t]) (trivially causal)."""
  table = jnp.asarray(np.log(table), jnp.float32)
  return lambda ids: table[ids]


def _chain(probs: dict, vocab: int, eps: float = 1e-4) -> np.ndarray:
  """Row-normalised transition table from {prev: {next: prob}}; pad never follows."""
  table = np.full((vocab, vocab), eps)
  for prev, row in probs.items():
    for nxt, p in row.items():
      table[prev, nxt] = p
  return table / table.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- model
def test_decoder_is_causal_and_uses_context(dec):
  apply, params, context, context_mask, _ = dec
  ids = jnp.asarray([[BOS, 5, 7, 9, 4, 3]] * 3, jnp.int32)
  out = apply(params, ids, context, context_mask)
  assert out.shape == (3, LEN, VOCAB) and out.dtype == jnp.float32
  assert "context_proj" in params["params"]
  changed = apply(params, ids.at[:, 3].set(8), context, context_mask)
  np.testing.assert_allclose(changed[:, :3], out[:, :3], atol=1e-6)
  assert np.abs(np.asarray(changed[:, 3:] - out[:, 3:])).max() > 1e-4
  # Masked-out context tokens do not matter; visible ones do.
  hidden_change = context.at[1, 2:].set(5.0)
  np.testing.assert_allclose(apply(params, ids, hidden_change, context_mask), out,
                             atol=1e-5)
  assert np.abs(np.asarray(apply(params, ids, context.at[1, 0].set(5.0), context_mask)
                           - out)[1]).max() > 1e-4
  # Shorter inputs: the same logits as the prefix of the full-length call.
  np.testing.assert_allclose(apply(params, ids[:, :2], context, context_mask),
                             out[:, :2], atol=1e-5)


def test_decoder_rejects_bad_inputs(dec):
  apply, params, context, context_mask, _ = dec
  ids = jnp.ones((3, LEN + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_len"):
    apply(params, ids, context, context_mask)
  with pytest.raises(ValueError, match="context_mask"):
    apply(params, ids[:, :LEN], context, context_mask[:, :2])


def test_lm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  ids = np.asarray([[1, 4, 6, 2, 0], [1, 3, 2, 0, 0]], np.int32)
  logp = helpers.np_log_softmax(logits[:, :-1])
  targets = ids[:, 1:]
  terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t]]
  got = losses.lm_loss(jnp.asarray(logits), jnp.asarray(ids))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  assert float(losses.lm_loss(jnp.asarray(logits), jnp.zeros((2, 5), jnp.int32))) == 0.0


# ----------------------------------------------------------------------------- decoding
def _python_greedy(logits_fn, rows, eos_id):
  """Reference: one row at a time, numpy argmax with pad excluded, stop at eos."""
  out, scores = np.full((rows, LEN), PAD), np.zeros(rows)
  out[:, 0] = BOS
  for r in range(rows):
    for t in range(1, LEN):
      logp = helpers.np_log_softmax(np.asarray(logits_fn(jnp.asarray(out, jnp.int32)))[r, t - 1])
      logp[PAD] = -np.inf
      out[r, t] = int(np.argmax(logp))
      scores[r] += logp[out[r, t]]
      if out[r, t] == eos_id:
        break
  return out, scores


def test_greedy_matches_python_loop_and_beam_one(dec):
  _, _, context, context_mask, decoder_fn = dec
  fn = lambda ids: decoder_fn(ids, context, context_mask)
  # The argmax path does not depend on eos_id until a row stops, so choosing eos = the token
  # row 0 emits at position 2 makes row 0 stop early while the others may run to the end.
  free, _ = _python_greedy(fn, 3, eos_id=-1)
  eos_id = int(free[0, 2])
  assert eos_id not in (PAD, BOS)
  want, want_scores = _python_greedy(fn, 3, eos_id)
  assert want[0, 2] == eos_id and np.all(want[0, 3:] == PAD)
  kw = dict(bos_id=BOS, eos_id=eos_id, pad_id=PAD)
  ids, scores = jax.jit(lambda: decoding.greedy_decode(fn, 3, LEN, **kw))()
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  np.testing.assert_allclose(
      decoding.sequence_log_likelihood(fn, ids[:, None]), np.asarray(scores)[:, None],
      rtol=1e-5)
  beam, beam_scores = jax.jit(lambda: decoding.beam_search(fn, 3, LEN, beam_size=1, **kw))()
  np.testing.assert_array_equal(beam, want)
  np.testing.assert_allclose(beam_scores, want_scores, rtol=1e-5)


def test_wide_beam_scores_and_tiles_context_batch_major(dec):
  _, _, context, context_mask, decoder_fn = dec
  fn = lambda ids: decoder_fn(ids, context, context_mask)
  free, _ = _python_greedy(fn, 3, eos_id=-1)
  eos_id = int(free[1, 3])
  decode = jax.jit(lambda c, m: captioning.decode_captions(
      decoder_fn, c, m, max_len=LEN, bos_id=BOS, eos_id=eos_id, beam_size=3, alpha=0.6))
  ids, scores = decode(context, context_mask)
  # The score is the length-penalised log-likelihood of the returned sequence.
  n = np.sum(np.asarray(ids)[:, 1:] != PAD, axis=1)
  np.testing.assert_allclose(decoding.sequence_log_likelihood(fn, ids[:, None])[:, 0],
                             np.asarray(scores) * ((5 + n) / 6) ** 0.6, rtol=1e-5)
  # Each example's result follows its own context (rows of the beams are batch-major).
  perm = np.asarray([2, 0, 1])
  ids_p, scores_p = decode(context[perm], context_mask[perm])
  np.testing.assert_array_equal(ids_p, np.asarray(ids)[perm])
  np.testing.assert_allclose(scores_p, np.asarray(scores)[perm], rtol=1e-5)


def test_beam_finds_best_sequence_that_greedy_misses():
  a, b = 3, 4
  table = _chain({BOS: {a: .5, b: .4, EOS: .1}, a: {a: .3, b: .3, EOS: .4},
                  b: {a: .05, b: .05, EOS: .9}}, vocab=5)
  fn = _markov_fn(table)
  greedy, g_score = decoding.greedy_decode(fn, 1, 4, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(greedy[0], [BOS, a, EOS, PAD])
  beam, score = jax.jit(lambda: decoding.beam_search(fn, 1, 4, bos_id=BOS, eos_id=EOS,
                                                     beam_size=2))()
  np.testing.assert_array_equal(beam[0], [BOS, b, EOS, PAD])
  np.testing.assert_allclose(score[0], np.log(table[BOS, b] * table[b, EOS]), rtol=1e-5)
  assert float(score[0]) > float(g_score[0]) + 0.5


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_exhaustive_beam_equals_brute_force(alpha):
  rng = np.random.default_rng(1)
  vocab, length = 5, 4
  table = rng.dirichlet(np.full(vocab, 0.7), size=vocab)
  table[:, PAD] = 1e-3
  table /= table.sum(1, keepdims=True)
  best, best_seq = -np.inf, None  # every bos-started sequence of non-pad tokens, cut at eos
  for gen in itertools.product(range(1, vocab), repeat=length - 1):
    n = gen.index(EOS) + 1 if EOS in gen else length - 1
    seq = (BOS,) + gen[:n]
    logp = sum(np.log(table[p, q]) for p, q in zip(seq, seq[1:]))
    score = logp / ((5 + n) / 6) ** alpha
    if score > best + 1e-9:
      best, best_seq = score, seq + (PAD,) * (length - 1 - n)
  # 64 beams keep every hypothesis of this tiny space, so the search is exact.
  ids, score = decoding.beam_search(_markov_fn(table), 2, length, bos_id=BOS, eos_id=EOS,
                                    beam_size=64, alpha=alpha)
  for row in range(2):
    np.testing.assert_array_equal(ids[row], best_seq)
  np.testing.assert_allclose(score, [best, best], rtol=1e-5)


def test_sequence_log_likelihood_matches_numpy():
  rng = np.random.default_rng(2)
  weights = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
  # A causal but non-Markov toy model: logits at t depend on the running sum of embeddings.
  fn = lambda ids: jnp.cumsum(jnp.asarray(weights)[ids], axis=1)
  cands = np.asarray([[[BOS, 4, EOS, PAD, PAD], [BOS, 5, 6, EOS, PAD]],
                      [[BOS, 7, 8, 9, EOS], [BOS, EOS, PAD, PAD, PAD]]], np.int32)
  want = np.zeros((2, 2))
  for b, k in itertools.product(range(2), range(2)):
    ids = cands[b, k]
    logits = np.cumsum(weights[ids], axis=0)
    logp = helpers.np_log_softmax(logits)
    want[b, k] = sum(logp[t - 1, ids[t]] for t in range(1, 5) if ids[t] != PAD)
  np.testing.assert_allclose(decoding.sequence_log_likelihood(fn, jnp.asarray(cands)), want,
                             rtol=1e-5)


def test_decoding_rejects_bad_arguments():
  fn = _markov_fn(_chain({}, 5))
  with pytest.raises(ValueError, match="distinct"):
    decoding.greedy_decode(fn, 1, 4, bos_id=BOS, eos_id=PAD)
  with pytest.raises(ValueError, match="max_len"):
    decoding.beam_search(fn, 1, 1, bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match="alpha"):
    decoding.beam_search(fn, 1, 4, bos_id=BOS, eos_id=EOS, alpha=-1.0)
  with pytest.raises(ValueError, match="logits"):
    decoding.greedy_decode(lambda ids: ids, 1, 4, bos_id=BOS, eos_id=EOS)


# ----------------------------------------------------------------------------- QA
# Answer list: A0 'x', A1 'y z', A2 'y w', A3 'v' (ids: x=3, y=4, z=5, w=6, v=7).
ANSWERS = np.asarray([[BOS, 3, EOS, PAD], [BOS, 4, 5, EOS], [BOS, 4, 6, EOS],
                      [BOS, 7, EOS, PAD]], np.int32)
# Question 0: first token 'y' is the most likely (0.5 vs 0.3 for 'x'), but 'y' splits its mass
# over two continuations, so the full answer 'x' (0.27) beats 'y z' (0.225) and 'y w' (0.225).
# Question 1: 'v' is the most likely both ways.
TABLES = np.stack([
    _chain({BOS: {3: .3, 4: .5, 7: .15}, 3: {EOS: .9}, 4: {5: .5, 6: .45}, 5: {EOS: .9},
            6: {EOS: .9}, 7: {EOS: .9}}, 8),
    _chain({BOS: {3: .1, 4: .1, 7: .7}, 3: {EOS: .9}, 4: {5: .5, 6: .45}, 5: {EOS: .9},
            6: {EOS: .9}, 7: {EOS: .9}}, 8)])


def _qa_decoder(ids, context, context_mask):
  """Context [N,1,1] holds the question number, which picks that question's Markov chain."""
  del context_mask
  tables = jnp.log(jnp.asarray(TABLES, jnp.float32))[context[:, 0, 0].astype(jnp.int32)]
  return jax.vmap(lambda tab, row: tab[row])(tables, ids)


def test_rank_answers_then_rescoring_changes_the_winner():
  context = jnp.asarray([0.0, 1.0]).reshape(2, 1, 1)
  first = qa.first_token_log_probs(_qa_decoder, context, None, BOS)
  np.testing.assert_allclose(first, np.log(TABLES[:, BOS]), rtol=1e-5)
  top_idx, top_logp = qa.rank_answers(first, ANSWERS, k=3)
  np.testing.assert_array_equal(top_idx[0], [1, 2, 0])  # ties (A1, A2) keep list order
  np.testing.assert_allclose(top_logp[0], np.log(TABLES[0, BOS, [4, 4, 3]]), rtol=1e-5)
  assert int(top_idx[1, 0]) == 3
  scores = qa.rescore_answers(_qa_decoder, context, None, ANSWERS, top_idx)
  want = [[np.log(np.prod([TABLES[q, p, n] for p, n in zip(a, a[1:]) if n != PAD]))
           for a in ANSWERS[np.asarray(top_idx[q])]] for q in range(2)]
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  predict = jax.jit(lambda c, k: qa.predict_answers(_qa_decoder, c, None, ANSWERS, k=k,
                                                    bos_id=BOS), static_argnums=1)
  np.testing.assert_array_equal(predict(context, 3), [0, 3])  # re-scoring picks 'x'
  np.testing.assert_array_equal(predict(context, 2), [1, 3])  # 'x' was never a candidate
  np.testing.assert_array_equal(predict(context, 1000), [0, 3])  # k clipped to the list
  batches = [{"ctx": context, "answer_idx": np.asarray([0, 2]), "valid": np.asarray([1, 1])},
             {"ctx": context, "answer_idx": np.asarray([0, -1]), "valid": np.asarray([1, 0])}]
  got = qa.evaluate(batches, lambda batch: predict(batch["ctx"], 3))
  assert got == {"acc": pytest.approx(200 / 3), "num_questions": 3.0}


def test_qa_rejects_bad_answer_lists():
  first = jnp.zeros((1, 8))
  with pytest.raises(ValueError, match="empty"):
    qa.rank_answers(first, np.asarray([[BOS, PAD, PAD]]), k=1)
  with pytest.raises(ValueError, match="answer_ids"):
    qa.rank_answers(first, np.asarray([BOS, 3, EOS]), k=1)
  with pytest.raises(ValueError, match="bos_id"):
    qa.predict_answers(_qa_decoder, jnp.zeros((1, 1, 1)), None, ANSWERS[:, ::-1].copy(), k=2,
                       bos_id=BOS)


def test_multiple_choice_accuracy():
  scores = np.asarray([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1], [0.4, 0.4, 0.0], [1.0, 2.0, 3.0]])
  # Row 2 ties the correct option with a wrong one: counted wrong (pessimistic).
  assert qa.multiple_choice_accuracy(scores, np.asarray([1, 0, 0, 0])) == 50.0
  assert qa.multiple_choice_accuracy(np.ones((3, 4)), np.zeros(3, int)) == 0.0
  assert qa.multiple_choice_accuracy(np.ones((2, 1)), np.zeros(2, int)) == 100.0
  with pytest.raises(ValueError, match="outside"):
    qa.multiple_choice_accuracy(scores, np.asarray([1, 0, 3, 0]))
  with pytest.raises(ValueError, match="NaN"):
    qa.multiple_choice_accuracy(np.full((1, 2), np.nan), np.zeros(1, int))


# ----------------------------------------------------------------------------- captioning
class _Words:
  """Tokenizer stand-in with the real decode contract (stop at eos, drop bos and pad)."""
  words = {3: "a", 4: "red", 5: "ball", 6: "moves", 7: "left"}

  def decode(self, ids):
    ids = [int(i) for i in ids]
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return " ".join(self.words[i] for i in ids if i not in (PAD, BOS))


def test_generate_and_evaluate_captions():
  batches = [{"index": np.asarray([7, 3]), "valid": np.asarray([True, True]),
              "ids": np.asarray([[BOS, 3, 4, 5, EOS, 6], [BOS, 4, 5, 6, 7, EOS]])},
             {"index": np.asarray([9, 0]), "valid": np.asarray([True, False]),
              "ids": np.asarray([[BOS, 5, EOS, PAD, PAD, PAD], [BOS, 3, 3, 3, 3, 3]])}]
  preds = captioning.generate_captions(batches, lambda batch: batch["ids"], _Words())
  assert preds == {7: "a red ball", 3: "red ball moves left", 9: "ball"}
  refs = {7: ["a red ball", "the red ball"], 3: ["red ball moves left"], 9: ["blue box"]}
  assert captioning.evaluate_captions(preds, refs) == caption_metrics.caption_scores(preds, refs)
  with pytest.raises(ValueError, match="twice"):
    captioning.generate_captions(batches[:1] * 2, lambda batch: batch["ids"], _Words())


# ----------------------------------------------------------------------------- sharding
def test_decoder_born_sharded_under_mesh_matches_plain():
  model = text_decoder.TextDecoder(16, LEN, "Pico")
  ids = jnp.asarray([[BOS, 5, 7, EOS, PAD, PAD]] * 4, jnp.int32)
  context = jax.random.normal(KEY, (4, 3, 32))
  params, sharded, plain = helpers.born_sharded_vs_plain(model, ids, context, key=KEY)
  emb = params["params"]["token_embedding"]["embedding"].value
  assert tuple(emb.sharding.spec) == ("tensor", "fsdp")
  np.testing.assert_allclose(sharded, plain, atol=1e-5)
