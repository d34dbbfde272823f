"""Retrieval metrics in pure numpy: ranks, R@k, median/mean rank, both directions, top-k re-ranking.

This file owns how a similarity matrix becomes retrieval numbers. It knows nothing about models:
`rerank_topk` only orchestrates a caller-supplied scoring function (the matching head).

Conventions:
  * `sim[q, c]` is the score of candidate c for query q; higher means more similar.
  * Ranks are 1-based. With several correct candidates, the best-ranked one counts.
  * Ties are broken PESSIMISTICALLY: a correct candidate tied with wrong candidates is ranked
    after all of them. So a constant similarity matrix with C candidates gives every query rank C
    (R@1 = 0 for C > 1), and a model that collapses to constant scores cannot look perfect.
    Correct candidates tied with each other do not push each other down.
  * NaN anywhere in `sim` is an error; +-inf are valid scores (e.g. -inf to exclude a candidate).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# Rows processed at once when ranking, so that memory stays O(chunk * num_candidates).
_ROW_CHUNK = 1024
_COLUMNS = ("MdR", "MnR")


def _check_sim(sim) -> np.ndarray:
  sim = np.asarray(sim)
  if sim.ndim != 2:
    raise ValueError(f"sim must be 2-D [num_queries, num_candidates], got shape {sim.shape}")
  if sim.shape[0] == 0 or sim.shape[1] == 0:
    raise ValueError(f"sim must have at least one query and one candidate, got shape {sim.shape}")
  if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
    raise ValueError(f"sim must hold real numbers, got dtype {sim.dtype}")
  sim = sim.astype(np.float64, copy=False)
  if np.isnan(sim).any():
    bad = np.argwhere(np.isnan(sim))[0]
    raise ValueError(f"sim contains NaN (first at query {bad[0]}, candidate {bad[1]})")
  return sim


def _correct_mask(gt, num_queries: int, num_candidates: int) -> np.ndarray:
  """bool [num_queries, num_candidates]: True where the candidate is a correct answer."""
  mask = np.zeros((num_queries, num_candidates), dtype=bool)
  if not isinstance(gt, (list, tuple)):
    gt = np.asarray(gt)  # numpy or jax arrays
    if gt.ndim != 1 or not (np.issubdtype(gt.dtype, np.integer) or gt.dtype == object):
      raise ValueError(f"gt must be a 1-D integer array or a list of sets, got array "
                       f"of shape {gt.shape} and dtype {gt.dtype}")
  if len(gt) != num_queries:
    raise ValueError(f"gt has {len(gt)} entries but sim has {num_queries} queries")
  if isinstance(gt, np.ndarray) and gt.dtype != object:  # one correct candidate per query
    bad = np.flatnonzero((gt < 0) | (gt >= num_candidates))
    if bad.size:
      raise ValueError(f"gt for query {bad[0]} has candidate index {gt[bad[0]]} outside "
                       f"[0, {num_candidates})")
    mask[np.arange(num_queries), gt] = True
    return mask
  for q, correct in enumerate(gt):
    try:
      idx = [int(c) for c in correct]
    except TypeError:  # a bare int stands for a single correct candidate
      idx = [int(correct)]
    if not idx:
      raise ValueError(f"gt for query {q} is empty; every query needs a correct candidate")
    bad = [c for c in idx if not 0 <= c < num_candidates]
    if bad:
      raise ValueError(f"gt for query {q} has candidate index {bad[0]} outside "
                       f"[0, {num_candidates})")
    mask[q, idx] = True
  return mask


def retrieval_ranks(sim, gt) -> np.ndarray:
  """1-based rank of the best-ranked correct candidate of each query, ties pessimistic.

  Args:
    sim: float [num_queries, num_candidates].
    gt: int array [num_queries] (the correct candidate of each query), or a sequence of
      num_queries non-empty sets of candidate indices (several correct candidates).
  Returns:
    int64 [num_queries]: 1 + the number of WRONG candidates scoring >= the best correct one.
  """
  sim = _check_sim(sim)
  mask = _correct_mask(gt, *sim.shape)
  ranks = np.empty(sim.shape[0], dtype=np.int64)
  for start in range(0, sim.shape[0], _ROW_CHUNK):
    s, m = sim[start:start + _ROW_CHUNK], mask[start:start + _ROW_CHUNK]
    best = np.where(m, s, -np.inf).max(axis=1, keepdims=True)
    # ">=" puts every tied wrong candidate ahead of the correct one (pessimistic).
    ranks[start:start + _ROW_CHUNK] = 1 + ((s >= best) & ~m).sum(axis=1)
  return ranks


def _check_ks(ks) -> tuple[int, ...]:
  ks = tuple(ks)
  if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
    raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
  return tuple(int(k) for k in ks)


def metrics_from_ranks(ranks, ks=(1, 5, 10)) -> dict[str, float]:
  """R@k (percent), median rank 'MdR' and mean rank 'MnR' from 1-based ranks."""
  ks = _check_ks(ks)
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0 or (ranks < 1).any():
    raise ValueError("ranks must be a non-empty 1-D array of 1-based ranks")
  out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
  out["MdR"] = float(np.median(ranks))  # may be x.5 for an even number of queries
  out["MnR"] = float(np.mean(ranks))
  return out


def retrieval_metrics(sim, gt, ks=(1, 5, 10)) -> dict[str, float]:
  """R@k in percent, 'MdR' and 'MnR' for one retrieval direction.

  Args:
    sim: float [num_queries, num_candidates]; higher is more similar; NaN raises ValueError.
    gt: int array [num_queries] with the index of the correct candidate, or a sequence of
      num_queries non-empty sets of correct candidate indices (the best-ranked one counts).
    ks: the k of each R@k key.
  Returns:
    {'R@1', 'R@5', 'R@10', 'MdR', 'MnR'} as Python floats. Ties are pessimistic (module doc).
  """
  ks = _check_ks(ks)
  return metrics_from_ranks(retrieval_ranks(sim, gt), ks)


def t2v_v2t_metrics(sim_text_video, text_to_video, ks=(1, 5, 10)) -> dict[str, float]:
  """Text-to-video and video-to-text metrics from one [num_texts, num_videos] matrix.

  t2v: each text is a query; its video is the one correct candidate.
  v2t: each video is a query (counted once however many captions it has); every text that
  maps to it is correct and the best-ranked one counts. Every video needs at least one text
  (use `retrieval_metrics` directly for candidate pools with caption-less distractor videos).
  Returns the keys of `retrieval_metrics` prefixed with 't2v_' and 'v2t_'.
  """
  sim = _check_sim(sim_text_video)
  t2v = np.asarray(text_to_video)
  if t2v.ndim != 1 or not np.issubdtype(t2v.dtype, np.integer):
    raise ValueError(f"text_to_video must be a 1-D integer array, got shape {t2v.shape} "
                     f"and dtype {t2v.dtype}")
  num_texts, num_videos = sim.shape
  if t2v.shape[0] != num_texts:
    raise ValueError(f"text_to_video has {t2v.shape[0]} entries but sim has {num_texts} texts")
  if t2v.size and (t2v.min() < 0 or t2v.max() >= num_videos):
    raise ValueError(f"text_to_video has a video index outside [0, {num_videos})")
  texts_of_video: list[list[int]] = [[] for _ in range(num_videos)]
  for text, video in enumerate(t2v):
    texts_of_video[int(video)].append(text)
  missing = [v for v, texts in enumerate(texts_of_video) if not texts]
  if missing:
    raise ValueError(f"{len(missing)} videos have no text (first: video {missing[0]}); "
                     "v2t needs at least one text per video")
  out = {f"t2v_{k}": v for k, v in retrieval_metrics(sim, t2v, ks).items()}
  out.update({f"v2t_{k}": v for k, v in retrieval_metrics(sim.T, texts_of_video, ks).items()})
  return out


def format_table(metrics: dict) -> str:
  """A plain aligned text table: one row per direction present (t2v, v2t), columns R@k..., MdR, MnR.

  R@k columns are those found in `metrics` (sorted by k); values are printed with one decimal.
  """
  rows = [p for p in ("t2v", "v2t") if any(k.startswith(p + "_") for k in metrics)]
  if not rows:
    raise ValueError("metrics has no 't2v_' or 'v2t_' keys to tabulate")
  ks = sorted({int(k.split("R@")[1]) for k in metrics
               if k.split("_", 1)[-1].startswith("R@") and k.split("R@")[1].isdigit()})
  columns = [f"R@{k}" for k in ks] + list(_COLUMNS)
  cells = [[f"{metrics[f'{p}_{c}']:.1f}" if f"{p}_{c}" in metrics else "-" for c in columns]
           for p in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  label = max(len(p) for p in rows)
  lines = [" " * label + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))]
  for p, r in zip(rows, cells):
    lines.append(f"{p:<{label}}" + "".join(f"  {v:>{w}}" for v, w in zip(r, widths)))
  return "\n".join(lines)


def rerank_topk(sim, rerank_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                batch_size: int | None = None) -> np.ndarray:
  """Re-scores each query's top-k candidates with `rerank_fn`, keeping them above the rest.

  Args:
    sim: finite float [num_queries, num_candidates] contrastive scores.
    rerank_fn: `(query_indices int32 [n], candidate_indices int32 [n]) -> scores [n]`, e.g. a
      batched matching head. Pairs come query-major, each query's candidates in descending
      contrastive order. Its outputs must be finite.
    k: candidates re-ranked per query; clipped to num_candidates. Ties at the top-k boundary
      are broken towards the lower candidate index.
    batch_size: if given, rerank_fn is called on chunks of exactly this many pairs (the last
      chunk padded by repeating its final pair, padding outputs dropped), so a jitted head sees
      one static shape; if None, one call with all num_queries * k pairs.
  Returns:
    float64 [num_queries, num_candidates]: top-k entries hold the rerank_fn outputs unchanged;
    the other entries keep their contrastive order but are shifted, per query, to lie below
    the lowest re-ranked score (by a margin of 1). Only within-row order is meaningful.
  """
  sim = _check_sim(sim)
  if not np.isfinite(sim).all():
    raise ValueError("rerank_topk needs finite sim (inf would make the shift undefined)")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
  num_queries, num_candidates = sim.shape
  k = min(int(k), num_candidates)
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # [Q, k]
  q_idx = np.repeat(np.arange(num_queries, dtype=np.int32), k)
  c_idx = top.reshape(-1).astype(np.int32)

  n = q_idx.size
  if batch_size is None:
    scores = np.asarray(rerank_fn(q_idx, c_idx), dtype=np.float64).reshape(-1)
    if scores.size != n:
      raise ValueError(f"rerank_fn returned {scores.size} scores for {n} pairs")
  else:
    parts = []
    for start in range(0, n, batch_size):
      qs, cs = q_idx[start:start + batch_size], c_idx[start:start + batch_size]
      valid = qs.size
      if valid < batch_size:  # pad to the static batch shape
        qs = np.concatenate([qs, np.full(batch_size - valid, qs[-1], np.int32)])
        cs = np.concatenate([cs, np.full(batch_size - valid, cs[-1], np.int32)])
      out = np.asarray(rerank_fn(qs, cs), dtype=np.float64).reshape(-1)
      if out.size != batch_size:
        raise ValueError(f"rerank_fn returned {out.size} scores for {batch_size} pairs")
      parts.append(out[:valid])
    scores = np.concatenate(parts)
  if not np.isfinite(scores).all():
    raise ValueError("rerank_fn returned non-finite scores")
  scores = scores.reshape(num_queries, k)

  result = sim.copy()
  if k < num_candidates:
    is_top = np.zeros(sim.shape, dtype=bool)
    np.put_along_axis(is_top, top, True, axis=1)
    rest_max = np.where(is_top, -np.inf, sim).max(axis=1, keepdims=True)
    shift = scores.min(axis=1, keepdims=True) - 1.0 - rest_max
    result = np.where(is_top, result, sim + shift)
  np.put_along_axis(result, top, scores, axis=1)
  return result
