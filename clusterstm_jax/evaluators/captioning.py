"""Video captioning evaluation: decoding captions from video tokens (greedy or beam search),
turning ids into strings, and scoring them with BLEU-4 / ROUGE-L / CIDEr.

Orchestration only; the model comes in as callables:
  decoder_fn(ids [N,L], context [N,M,D], context_mask [N,M] | None) -> logits [N,L,V]
    (the captioning TextDecoder with params bound; context = the video tokens);
  caption_fn(batch) -> ids [b, L] (e.g. jit(encode video -> decode_captions)), one row per row
    of the batch it is given.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from clusterstm_jax import decoding
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.evaluators import caption_metrics
from clusterstm_jax.evaluators import common

__all__ = ["run", "decode_captions", "evaluate_captions", "generate_captions"]


def decode_captions(decoder_fn, context, context_mask=None, *, max_len: int, bos_id: int,
                    eos_id: int, pad_id: int = 0, beam_size: int = 1, alpha: float = 0.0):
  """Captions for a batch of contexts -> (ids int32 [B, max_len], scores float32 [B]).

  beam_size 1 is greedy decoding; otherwise beam search with GNMT length penalty `alpha`
  (decoding.beam_search; the context is tiled beam_size times). jit-friendly: max_len,
  beam_size and alpha are static.
  """
  batch = context.shape[0]
  if beam_size == 1:
    return decoding.greedy_decode(lambda ids: decoder_fn(ids, context, context_mask), batch,
                                  max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  ctx = decoding.repeat_rows(context, beam_size)
  mask = decoding.repeat_rows(context_mask, beam_size)
  return decoding.beam_search(lambda ids: decoder_fn(ids, ctx, mask), batch, max_len,
                              bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                              beam_size=beam_size, alpha=alpha)


def generate_captions(batches: Iterable[dict], caption_fn: Callable[[dict], np.ndarray],
                      tokenizer, *, id_key: str = "index",
                      valid_key: str = "valid") -> dict[Hashable, str]:
  """{example id: caption string} over an eval loader.

  Each batch's ids come from caption_fn(batch) [b, L] and are turned into text by
  tokenizer.decode (stops at eos, drops bos and pad). Example ids are batch[id_key]; rows with
  batch[valid_key] False (loader padding) are skipped when that key is present. An id seen
  twice is an error (a misconfigured loader).
  """
  out: dict[Hashable, str] = {}
  for batch in batches:
    ids = np.asarray(caption_fn(batch))
    keys = np.asarray(batch[id_key]).reshape(-1)
    if ids.ndim != 2 or ids.shape[0] != keys.shape[0]:
      raise ValueError(f"caption_fn must return [b={keys.shape[0]}, L] ids for the batch, got "
                       f"shape {ids.shape}")
    valid = np.asarray(batch.get(valid_key, np.ones(keys.shape, bool)), bool).reshape(-1)
    for key, row, ok in zip(keys.tolist(), ids, valid):
      if not ok:
        continue
      if key in out:
        raise ValueError(f"caption generation saw example id {key!r} twice")
      out[key] = tokenizer.decode(row)
  return out


def evaluate_captions(predictions: Mapping[Hashable, str],
                      references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
  """{'BLEU-4', 'ROUGE-L', 'CIDEr'} (x100) of predictions {id: str} against references
  {id: [str, ...]} with the same ids; see caption_metrics.caption_scores."""
  return caption_metrics.caption_scores(predictions, references)


def run(ev, ctx: common.Context):
  """BLEU-4, ROUGE-L, CIDEr of the split's captions against all the references of each video
  (its `captions`; shapes: its one caption) -> (metrics, details: {'predictions':
  {id: str}, 'references': {id: [str]}}). Uses predict_fns 'caption_context' and 'decode'."""
  ctx.needs('caption_context', 'decode', what='captioning', tasks='caption')
  config, tokenizer, mesh, params = ctx.config, ctx.tokenizer, ctx.mesh, ctx.params
  caption_context, decode = ctx.predict_fns['caption_context'], ctx.predict_fns['decode']
  max_len = config.data.max_text_len  # the caption decoder's length

  def generate(params, video):
    context = caption_context(params, video)
    decoder = lambda ids, c, m: decode(params, ids, c, m)
    ids, _ = decode_captions(
        decoder, context, None, max_len=max_len, bos_id=tokenizer.cls_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, beam_size=ev.beam_size,
        alpha=ev.alpha)
    return ids

  generate = ctx.jit(generate)

  def batches():
    for batch in ctx.loader(ev):
      yield {'video': batch['video'], 'index': common.global_rows(batch['index'], mesh),
             'valid': common.global_rows(batch['valid'], mesh)}

  caption_fn = lambda b: generate(params, sharding_lib.global_batch({'video': b['video']},
                                                                    mesh)['video'])
  predictions = generate_captions(batches(), caption_fn, tokenizer)
  source = pipeline.get_source(config.data, ev.split or config.data.eval_split)
  references = {}
  for i in range(len(source)):
    ex = source[i]
    if int(ex['id']) in predictions:  # every reference caption (COCO-caption protocol)
      refs = [qa_data.as_text(c) for c in ex.get('captions', ())]
      references[int(ex['id'])] = refs or [qa_data.as_text(ex['caption'])]
  metrics = evaluate_captions(predictions, references)
  return metrics, {'predictions': predictions, 'references': references}
