"""Zero-shot text-video retrieval: contrastive similarities over a whole split, R@k and ranks."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from clusterstm_jax import sharding as sharding_lib
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
    gvalid = _global_rows(valid, mesh)
    gindex = _global_rows(np.asarray(batch['index']), mesh)
    videos.append(v[gvalid])
    texts.append(t[gvalid])
    indices.append(gindex[gvalid])
  video, text, index = map(np.concatenate, (videos, texts, indices))
  order = np.argsort(index, kind='stable')
  if len(np.unique(index)) != len(index):
    raise RuntimeError('evaluation saw an example twice; the eval loader is misconfigured')
  return video[order], text[order], index[order]


def _global_rows(local: np.ndarray, mesh) -> np.ndarray:
  """Host values of a batch-sharded per-process column, gathered to the global batch."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def similarity(video: np.ndarray, text: np.ndarray) -> np.ndarray:
  """[num_texts, num_videos]: per-frame cosine similarities averaged over frames (as in VTC)."""
  return np.einsum('se,vte->sv', text, video) / video.shape[1]


def evaluate(batches, mesh, encode_video, encode_text, params) -> dict[str, float]:
  video, text, _ = encode_split(batches, mesh, encode_video, encode_text, params)
  sim = similarity(video, text)
  # One caption per clip: text i belongs to video i.
  return metrics_lib.t2v_v2t_metrics(sim, np.arange(sim.shape[0]))
