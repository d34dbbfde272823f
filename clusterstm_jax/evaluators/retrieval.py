"""Text-video retrieval, zero-shot or fine-tuned: one path for every model.

Contrastive similarities (per-frame cosine averaged over frames, as VTC) over a whole split
rank every candidate; with `ev.k > 0` and a model with a matching head (predict_fns 'encode' and
'match'), each query's top-k candidates are re-ranked by the matching head (UMT). Metrics:
t2v and v2t R@1/5/10, MdR, MnR (re-ranked, or contrastive when not), and with re-ranking also
the contrastive ones as itc_*.

The texts are each record's `caption` (MSR-VTT 1k-A: the one test sentence; DiDeMo, ActivityNet:
the paragraph), or, on datasets whose protocol ranks every caption (MSVD), all its `captions`:
t2v then has one query per caption, and v2t counts a video's best-ranked caption.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import common
from clusterstm_jax.evaluators import metrics as metrics_lib


def encode_split(batches: Iterable[dict], mesh, encode_video: Callable, encode_text: Callable,
                 params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encodes every valid example of an eval loader once -> (video [V,T,E], text [V,E], index)."""
  videos, texts, indices = [], [], []
  for batch in batches:
    valid = np.asarray(batch['valid'])
    arrays = sharding_lib.global_batch({'video': batch['video'], 'text': batch['text']}, mesh)
    # Encoders return replicated arrays, so every process holds the global result.
    v = np.asarray(encode_video(params, arrays['video']))
    t = np.asarray(encode_text(params, arrays['text']))
    gvalid = common.global_rows(valid, mesh)
    gindex = common.global_rows(np.asarray(batch['index']), mesh)
    videos.append(v[gvalid])
    texts.append(t[gvalid])
    indices.append(gindex[gvalid])
  video, text, index = map(np.concatenate, (videos, texts, indices))
  order = np.argsort(index, kind='stable')
  if len(np.unique(index)) != len(index):
    raise RuntimeError('evaluation saw an example twice; the eval loader is misconfigured')
  return video[order], text[order], index[order]


def similarity(video: np.ndarray, text: np.ndarray) -> np.ndarray:
  """[num_texts, num_videos]: per-frame cosine similarities averaged over frames (as in VTC)."""
  return np.einsum('se,vte->sv', text, video) / video.shape[1]


def all_captions(ctx: common.Context, ev) -> tuple[np.ndarray, np.ndarray] | None:
  """(ids [texts, L], video position [texts]) of every caption of the split, on datasets whose
  protocol ranks them all (pipeline.eval_all_captions); None otherwise. Videos without a
  caption stay candidates."""
  data = ctx.config.data
  if not pipeline.eval_all_captions(data):
    return None
  source = pipeline.get_source(data, ev.split or data.eval_split)
  texts, owner = [], []
  for i in range(len(source)):
    caps = source[i]['captions']
    texts += list(caps)
    owner += [i] * len(caps)
  return (ctx.tokenizer.encode_batch(texts, data.max_text_len),
          np.asarray(owner, np.int32))


def _encode_texts(ctx: common.Context, fn, ids: np.ndarray, batch_size: int) -> list:
  """fn(params, ids) over every row of ids in fixed-size batches -> its outputs, concatenated."""
  pad = -len(ids) % batch_size
  padded = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)]) if pad else ids
  shard = sharding_lib.batch_sharding(ctx.mesh, 2)
  parts = [[np.asarray(x) for x in _as_tuple(fn(ctx.params, common.put(padded[s:s + batch_size],
                                                                       shard)))]
           for s in range(0, len(padded), batch_size)]
  return [np.concatenate(p)[:len(ids)] for p in zip(*parts)]


def _as_tuple(x):
  return x if isinstance(x, tuple) else (x,)


def run(ev, ctx: common.Context):
  """-> (metrics, details={}); see the module docstring."""
  ctx.needs('embed_video', 'embed_text', what='retrieval', tasks='with video and text towers')
  if ev.k > 0 and 'match' in ctx.predict_fns:
    return _reranked(ev, ctx), {}
  captions = all_captions(ctx, ev)
  if captions is not None:
    fns = ctx.predict_fns
    video = _encode_videos(ev, ctx)
    (text,) = _encode_texts(ctx, ctx.jit(fns['embed_text']), captions[0], ev.batch_size)
    sim = similarity(video, text)
    return {**_directions(sim, sim.T, captions[1]), 'num_texts': float(len(text))}, {}
  fns = ctx.predict_fns
  video, text, _ = encode_split(ctx.loader(ev), ctx.mesh, ctx.jit(fns['embed_video']),
                                ctx.jit(fns['embed_text']), ctx.params)
  sim = similarity(video, text)
  # One caption per clip: text i belongs to video i.
  return metrics_lib.t2v_v2t_metrics(sim, np.arange(sim.shape[0])), {}


def _encode_videos(ev, ctx: common.Context) -> np.ndarray:
  """Per-frame features [V, T, E] of every video of the split (its text is not used)."""
  embed = ctx.jit(ctx.predict_fns['embed_video'])
  videos, indices = [], []
  for batch in ctx.loader(ev):
    v = np.asarray(embed(ctx.params, sharding_lib.global_batch({'video': batch['video']},
                                                               ctx.mesh)['video']))
    valid = common.global_rows(batch['valid'], ctx.mesh)
    videos.append(v[valid])
    indices.append(common.global_rows(np.asarray(batch['index']), ctx.mesh)[valid])
  return np.concatenate(videos)[np.argsort(np.concatenate(indices), kind='stable')]


def _reranked(ev, ctx: common.Context) -> dict[str, float]:
  mesh, params = ctx.mesh, ctx.params
  encode, match = ctx.predict_fns['encode'], ctx.predict_fns['match']

  def match_scores(params, tokens, hidden, ids, text_idx, video_idx):
    return match(params, hidden[text_idx], ids[text_idx], tokens[video_idx])

  encode, match_scores = ctx.jit(encode), ctx.jit(match_scores)
  parts = []
  for batch in ctx.loader(ev):
    arrays = sharding_lib.global_batch({'video': batch['video'], 'text': batch['text']}, mesh)
    valid = common.global_rows(batch['valid'], mesh)
    host = [np.asarray(x) for x in encode(params, arrays['video'], arrays['text'])]
    host += [common.global_rows(batch['text'], mesh), common.global_rows(batch['index'], mesh)]
    parts.append([x[valid] for x in host])
  video_feat, tokens, text_feat, hidden, ids, index = map(np.concatenate, zip(*parts))
  order = np.argsort(index, kind='stable')
  if len(np.unique(index)) != len(index):
    raise RuntimeError('evaluation saw an example twice; the eval loader is misconfigured')
  video_feat, tokens, text_feat, hidden, ids = (
      x[order] for x in (video_feat, tokens, text_feat, hidden, ids))

  gt = np.arange(len(video_feat))  # text i describes video i
  captions = all_captions(ctx, ev)
  if captions is not None:  # every caption a query: its own text features and hidden states
    ids, gt = captions
    text_feat, hidden = _encode_texts(ctx, ctx.jit(ctx.predict_fns['encode_text']), ids,
                                      ev.batch_size)
  sim = similarity(video_feat, text_feat)  # [texts, videos]
  out = {f'itc_{k}': v for k, v in _directions(sim, sim.T, gt).items()}
  repl, pairs = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  tables = [common.put(x, repl) for x in (tokens, hidden, ids)]  # on device once
  shards = sharding_lib.batch_size_per_shard(mesh)
  if ev.rerank_batch_size % shards:
    raise UserError(f'rerank_batch_size={ev.rerank_batch_size} is not a multiple of the '
                    f'{shards} data-parallel shards')

  score = PairScores(lambda t, v: np.asarray(match_scores(
      params, *tables, common.put(t, pairs), common.put(v, pairs))),
                     ev.rerank_batch_size, num_videos=sim.shape[1])
  t2v = metrics_lib.rerank_topk(sim, score, ev.k)
  v2t = metrics_lib.rerank_topk(sim.T, lambda v, t: score(t, v), ev.k)
  out.update(_directions(t2v, v2t, gt))
  out['num_videos'] = float(sim.shape[1])
  out['num_texts'] = float(sim.shape[0])
  return out


def _directions(t2v: np.ndarray, v2t: np.ndarray, owner: np.ndarray) -> dict[str, float]:
  """t2v and v2t metrics of scores [texts, videos] and [videos, texts]; text i describes video
  owner[i]. A video's correct texts are all of its captions (the best-ranked counts); a video
  without one is a t2v candidate but no v2t query."""
  texts_of = [set() for _ in range(t2v.shape[1])]
  for t, v in enumerate(owner.tolist()):
    texts_of[v].add(t)
  queries = [v for v, texts in enumerate(texts_of) if texts]
  out = {f't2v_{k}': x for k, x in metrics_lib.retrieval_metrics(t2v, owner).items()}
  out.update({f'v2t_{k}': x for k, x in metrics_lib.retrieval_metrics(
      v2t[queries], [texts_of[v] for v in queries]).items()})
  return out


class PairScores:
  """Matching-head scores of (text, video) pairs, each pair computed once: the t2v and v2t
  top-k lists share most of their pairs. New pairs go to `fn` in chunks of exactly
  `batch_size` (the last one padded), so the jitted head sees one static shape."""

  def __init__(self, fn, batch_size: int, num_videos: int):
    self._fn, self._batch_size, self._num_videos = fn, batch_size, num_videos
    self._known: dict[int, float] = {}

  def __call__(self, text_idx: np.ndarray, video_idx: np.ndarray) -> np.ndarray:
    keys = text_idx.astype(np.int64) * self._num_videos + video_idx
    new = np.unique([k for k in keys.tolist() if k not in self._known]).astype(np.int64)
    for start in range(0, new.size, self._batch_size):
      chunk = new[start:start + self._batch_size]
      padded = np.pad(chunk, (0, self._batch_size - chunk.size), mode='edge')
      out = self._fn((padded // self._num_videos).astype(np.int32),
                     (padded % self._num_videos).astype(np.int32))
      self._known.update(zip(chunk.tolist(), out[:chunk.size].tolist()))
    return np.asarray([self._known[k] for k in keys.tolist()])
