"""Tests for evaluators/metrics.py (retrieval; with evaluators/retrieval.py's pair scores for the
re-ranking) and evaluators/caption_metrics.py (captioning).

Retrieval numbers are checked against ranks worked out by hand and against a brute-force
sort; BLEU-4 and CIDEr-D against direct re-implementations of their formulas written here.
"""
import math
import os
from collections import Counter

import numpy as np
import pytest

from clusterstm_jax.evaluators import metrics as M
from clusterstm_jax.evaluators import retrieval as retrieval_eval
from tests import helpers

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------- retrieval

def test_identity_is_perfect():
  out = M.retrieval_metrics(np.eye(5), np.arange(5))
  assert out == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_reversed_ranks():
  # sim[q, c] = c: candidate 4 always on top, so correct candidate c has rank 5 - c.
  sim = np.tile(np.arange(5.0), (5, 1))
  np.testing.assert_array_equal(M.retrieval_ranks(sim, np.arange(5)), [5, 4, 3, 2, 1])
  out = M.retrieval_metrics(sim, np.arange(5), ks=(1, 2))
  assert out == {"R@1": 20.0, "R@2": 40.0, "MdR": 3.0, "MnR": 3.0}


def test_hand_made_ranks():
  sim = np.array([[0.1, 0.9, 0.5, 0.3],   # correct 0.1 below three -> rank 4
                  [0.2, 0.8, 0.1, 0.0],   # correct on top -> rank 1
                  [0.7, 0.1, 0.6, 0.2],   # 0.7 above -> rank 2
                  [0.3, 0.2, 0.9, 0.4]])  # 0.9 above -> rank 2
  np.testing.assert_array_equal(M.retrieval_ranks(sim, np.arange(4)), [4, 1, 2, 2])
  out = M.retrieval_metrics(sim, np.arange(4), ks=(1, 2, 3))
  assert out == {"R@1": 25.0, "R@2": 75.0, "R@3": 75.0, "MdR": 2.0, "MnR": 2.25}


def test_ties_are_pessimistic():
  const = np.zeros((3, 3))
  np.testing.assert_array_equal(M.retrieval_ranks(const, np.arange(3)), [3, 3, 3])
  assert M.retrieval_metrics(const, np.arange(3))["R@1"] == 0.0
  row = np.array([[0.5, 0.5, 0.2]])
  # A tied wrong candidate goes first whichever side of it the correct one sits.
  assert M.retrieval_ranks(row, np.array([0]))[0] == 2
  assert M.retrieval_ranks(row, np.array([1]))[0] == 2
  # Two tied correct candidates do not push each other down.
  assert M.retrieval_ranks(row, [{0, 1}])[0] == 1


def _brute_force_ranks(sim, gt_sets):
  ranks = []
  for q, correct in enumerate(gt_sets):
    # Sort by score descending, wrong before correct on ties; first correct position counts.
    order = sorted(range(sim.shape[1]), key=lambda c: (-sim[q, c], c in correct))
    ranks.append(1 + min(order.index(c) for c in correct))
  return np.array(ranks)


def test_ranks_match_brute_force_with_ties():
  rng = np.random.default_rng(0)
  sim = rng.integers(0, 4, size=(7, 9)).astype(np.float32)  # many ties
  gt_sets = [set(rng.choice(9, size=rng.integers(1, 4), replace=False).tolist())
             for _ in range(7)]
  np.testing.assert_array_equal(M.retrieval_ranks(sim, gt_sets),
                                _brute_force_ranks(sim, gt_sets))
  gt = rng.integers(0, 9, size=7)
  np.testing.assert_array_equal(M.retrieval_ranks(sim, gt),
                                _brute_force_ranks(sim, [{int(g)} for g in gt]))


def test_t2v_v2t_several_captions_per_video():
  sim = np.array([[0.9, 0.1, 0.0],    # t0 -> v0: rank 1
                  [0.2, 0.6, 0.1],    # t1 -> v0: rank 2
                  [0.3, 0.3, 0.8],    # t2 -> v1: tie with v0 and 0.8 above -> rank 3
                  [0.1, 0.2, 0.4],    # t3 -> v2: rank 1
                  [0.5, 0.7, 0.6]])   # t4 -> v2: rank 2
  text_to_video = np.array([0, 0, 1, 2, 2])
  out = M.t2v_v2t_metrics(sim, text_to_video, ks=(1, 2))
  # v2t: v0 best correct t0 (0.9) rank 1; v1 t2 (0.3) below t1 0.6, t4 0.7 -> rank 3;
  # v2 best correct t4 (0.6) below t2 0.8 -> rank 2. Three queries: videos count once.
  expected = {"t2v_R@1": 40.0, "t2v_R@2": 80.0, "t2v_MdR": 2.0, "t2v_MnR": 1.8,
              "v2t_R@1": 100 / 3, "v2t_R@2": 200 / 3, "v2t_MdR": 2.0, "v2t_MnR": 2.0}
  assert out.keys() == expected.keys()
  for k, v in expected.items():
    assert out[k] == pytest.approx(v, abs=1e-12), k


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="NaN"):
    M.retrieval_metrics(np.array([[0.1, np.nan]]), np.array([0]))
  with pytest.raises(ValueError, match="outside"):
    M.retrieval_metrics(np.eye(2), np.array([0, 2]))
  with pytest.raises(ValueError, match="2 queries"):
    M.retrieval_metrics(np.eye(2), np.array([0]))
  with pytest.raises(ValueError, match="empty"):
    M.retrieval_metrics(np.eye(2), [{0}, set()])
  with pytest.raises(ValueError, match="no text"):
    M.t2v_v2t_metrics(np.eye(3)[:2], np.array([0, 1]))


def test_format_table():
  metrics = M.t2v_v2t_metrics(np.eye(4), np.arange(4))
  metrics["t2v_R@1"] = 49.74
  lines = M.format_table(metrics).splitlines()
  assert len(lines) == 3 and len({len(l) for l in lines}) == 1  # aligned
  assert lines[0].split() == ["R@1", "R@5", "R@10", "MdR", "MnR"]
  assert lines[1].split() == ["t2v", "49.7", "100.0", "100.0", "1.0", "1.0"]
  assert lines[2].split()[0] == "v2t"
  with pytest.raises(ValueError):
    M.format_table({"R@1": 1.0})


def test_rerank_topk():
  sim = np.array([[0.9, 0.1, 0.5, 0.3],
                  [0.2, 0.8, 0.8, 0.0]])   # tie at the top: lower index first
  table = np.array([[-5.0, 99.0, -3.0, 99.0],
                    [99.0, 1.0, 2.0, 99.0]])  # 99 = must never be asked for
  calls = []

  def fn(q, c):
    calls.append((q.copy(), c.copy()))
    return table[q, c]

  out = M.rerank_topk(sim, fn, k=2, batch_size=3)
  # Pairs query-major, each in contrastive order; 4 pairs in 2 padded calls of 3.
  assert [len(q) for q, _ in calls] == [3, 3]
  q_all = np.concatenate([q for q, _ in calls])[:4]
  c_all = np.concatenate([c for _, c in calls])[:4]
  np.testing.assert_array_equal(q_all, [0, 0, 1, 1])
  np.testing.assert_array_equal(c_all, [0, 2, 1, 2])
  # Re-ranked entries hold the rerank scores exactly; the rest stay below, in their old order.
  np.testing.assert_array_equal(out[0, [0, 2]], [-5.0, -3.0])
  np.testing.assert_array_equal(out[1, [1, 2]], [1.0, 2.0])
  np.testing.assert_array_equal(np.argsort(-out, axis=1), [[2, 0, 3, 1], [2, 1, 0, 3]])
  assert M.retrieval_ranks(out, np.array([2, 2])).tolist() == [1, 1]

  # k >= num_candidates re-scores everything in one call when batch_size is None.
  full = M.rerank_topk(sim, lambda q, c: 10.0 * q + c, k=10)
  np.testing.assert_array_equal(full, 10.0 * np.arange(2)[:, None] + np.arange(4))
  with pytest.raises(ValueError, match="non-finite"):
    M.rerank_topk(sim, lambda q, c: np.full(q.shape, np.nan), k=1)


def test_pair_scores_compute_each_pair_once_in_static_chunks():
  calls = []

  def head(t, v):
    calls.append((t.copy(), v.copy()))
    return 10.0 * t + v

  sim = np.random.default_rng(0).normal(size=(3, 5))
  score = retrieval_eval.PairScores(head, batch_size=4, num_videos=5)
  t2v = M.rerank_topk(sim, score, 3)
  v2t = M.rerank_topk(sim.T, lambda v, t: score(t, v), 2)
  direct = lambda t, v: 10.0 * t + v
  np.testing.assert_array_equal(t2v, M.rerank_topk(sim, direct, 3))
  np.testing.assert_array_equal(
      v2t, M.rerank_topk(sim.T, lambda v, t: direct(t, v), 2))
  assert all(len(t) == len(v) == 4 for t, v in calls)  # one static shape, padded
  top_t2v = {(t, int(v)) for t in range(3) for v in np.argsort(-sim[t], kind='stable')[:3]}
  top_v2t = {(int(t), v) for v in range(5) for t in np.argsort(-sim[:, v], kind='stable')[:2]}
  new_v2t = top_v2t - top_t2v
  assert new_v2t and len(new_v2t) < len(top_v2t)  # the sample shares some pairs
  # Each pair once: v2t computes only the pairs t2v did not.
  assert len(calls) == math.ceil(len(top_t2v) / 4) + math.ceil(len(new_v2t) / 4)
  seen = {(int(a), int(b)) for t, v in calls for a, b in zip(t, v)}
  assert seen == top_t2v | top_v2t


# ----------------------------------------------------------------------------- captioning

cm = pytest.importorskip("clusterstm_jax.evaluators.caption_metrics")

PREDS = {
    "vid1": "A man is playing a guitar.",
    "vid2": "a woman cuts onions",
    "vid3": "A dog runs on the grass",
    7: "A man is cooking food in a kitchen.",
}
REFS = {
    "vid1": ["A man is playing the guitar on a stage.", "Someone plays an acoustic guitar."],
    "vid2": ["A woman is cutting an onion in the kitchen.",
             "A woman is slicing onions with a knife."],
    "vid3": ["A dog is running on the grass.", "A dog runs on grass.",
             "The brown dog runs across a field, of grass."],
    7: ["A man is cooking food in the kitchen.", "A chef prepares a meal in a kitchen.",
        "Someone is cooking."],
}


def _toks(s):  # independent of cm.tokenize; enough for the punctuation in the sample
  return s.lower().replace(".", "").replace(",", "").split()


def _ngrams(tokens, n):
  return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _reference_bleu4(preds, refs):
  """Corpus BLEU-4: clipped n-gram counts summed over the corpus, closest reference length
  (ties -> the shorter), brevity penalty on the corpus totals."""
  correct, guess, hyp_len, ref_len = np.zeros(4), np.zeros(4), 0, 0
  for i in preds:
    h, rs = _toks(preds[i]), [_toks(r) for r in refs[i]]
    for n in range(1, 5):
      hc = _ngrams(h, n)
      maxref = Counter()
      for r in rs:
        maxref |= _ngrams(r, n)  # elementwise max
      correct[n - 1] += sum(min(c, maxref[g]) for g, c in hc.items())
      guess[n - 1] += max(0, len(h) - n + 1)
    hyp_len += len(h)
    ref_len += min((len(r) for r in rs), key=lambda L: (abs(L - len(h)), L))
  bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  return bp * math.exp(np.mean(np.log(correct / guess))), bp


def _reference_cider_d(preds, refs, sigma=6.0):
  """CIDEr-D: tf-idf n-gram vectors (n = 1..4, df over each id's reference set), clipped
  cosine to every reference, Gaussian length penalty, mean over n, mean over refs, x10."""
  ids = list(preds)
  num = len(ids)
  df = Counter()
  for i in ids:
    df.update({g for r in refs[i] for n in range(1, 5) for g in _ngrams(_toks(r), n)})

  def vec(tokens, n):
    return {g: c * (math.log(num) - math.log(max(1.0, df[g])))
            for g, c in _ngrams(tokens, n).items()}

  scores = []
  for i in ids:
    h = _toks(preds[i])
    total = 0.0
    for r in map(_toks, refs[i]):
      # Word-length difference (pycocoevalcap counts bigrams: same for non-empty captions).
      pen = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma ** 2))
      per_n = []
      for n in range(1, 5):
        vh, vr = vec(h, n), vec(r, n)
        nh = math.sqrt(sum(v * v for v in vh.values()))
        nr = math.sqrt(sum(v * v for v in vr.values()))
        dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
        per_n.append(dot / (nh * nr) * pen if nh and nr else 0.0)
      total += np.mean(per_n)
    scores.append(10.0 * total / len(refs[i]))
  return float(np.mean(scores))


def test_tokenize():
  assert cm.tokenize("A Man's  T-shirt,\tis RED!") == "a mans t shirt is red"
  assert cm.tokenize("...") == ""


def test_bleu4_and_cider_match_direct_implementations():
  out = cm.caption_scores(PREDS, REFS)
  bleu, bp = _reference_bleu4(PREDS, REFS)
  assert bp < 1.0  # the sample exercises the brevity penalty
  assert out["BLEU-4"] == pytest.approx(100 * bleu, abs=1e-6)
  cider = _reference_cider_d(PREDS, REFS)
  assert cider > 0.1
  assert out["CIDEr"] == pytest.approx(100 * cider, abs=1e-6)
  assert set(out) == {"BLEU-4", "ROUGE-L", "CIDEr"}


def test_rouge_l_by_hand():
  preds = {"a": "A man plays a guitar.", "b": "The cat sat"}
  refs = {"a": ["a man is playing the guitar"], "b": ["the cat sat on the mat", "a cat"]}
  beta2 = 1.2 ** 2
  # a: LCS(a man guitar) = 3, P = 3/5, R = 3/6.
  f_a = (1 + beta2) * (3 / 5) * (3 / 6) / (3 / 6 + beta2 * 3 / 5)
  # b: best precision 3/3 (ref 1) and best recall 1/2 (both refs), taken separately.
  f_b = (1 + beta2) * 1.0 * 0.5 / (0.5 + beta2 * 1.0)
  out = cm.caption_scores(preds, refs)
  assert out["ROUGE-L"] == pytest.approx(100 * (f_a + f_b) / 2, abs=1e-9)


def test_caption_inputs_checked():
  with pytest.raises(ValueError, match="different ids"):
    cm.caption_scores({"a": "x"}, {"b": ["x"]})
  with pytest.raises(ValueError, match="non-empty list"):
    cm.caption_scores({"a": "x"}, {"a": []})
  with pytest.raises(ValueError, match="must be a str"):
    cm.caption_scores({"a": ["x"]}, {"a": ["x"]})


def test_caption_metrics_need_no_java():
  # Java made unreachable: scoring must still work and never load the Java-based modules.
  code = ("import sys\n"
          "from clusterstm_jax.evaluators import caption_metrics as cm\n"
          "print(cm.caption_scores({'a': 'a cat'}, {'a': ['a cat sits']}))\n"
          "bad = [m for m in sys.modules if m.split('.')[:2] in (['pycocoevalcap', 'tokenizer'],"
          " ['pycocoevalcap', 'meteor'], ['pycocoevalcap', 'spice'], ['pycocoevalcap', 'eval'])]\n"
          "assert not bad, bad\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PATH")}
  env.update(PATH="/nonexistent", PYTHONPATH=helpers.REPO)
  proc = helpers.run_python("-c", code, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "CIDEr" in proc.stdout


def test_several_references_score_as_pycocoevalcap_computes_them():
  """caption_scores on the fixed sample equals pycocoevalcap's own Bleu(4) and Cider called on
  the same (already tokenised) references, every reference of each id counted."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  gts = {i: [cm.tokenize(r) for r in REFS[i]] for i in PREDS}
  res = {i: [cm.tokenize(PREDS[i])] for i in PREDS}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  out = cm.caption_scores(PREDS, REFS)
  assert out["BLEU-4"] == pytest.approx(100 * bleu[3], abs=1e-9)
  assert out["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)
  # One reference per id (the first) scores differently: all of them are used.
  first = cm.caption_scores(PREDS, {i: REFS[i][:1] for i in PREDS})
  assert first["BLEU-4"] != pytest.approx(out["BLEU-4"])
