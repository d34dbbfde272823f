r"""Evaluation of a trained model, and its command line.

  python -m clusterstm_jax.evaluate --config=configs/eval_retrieval.py --config.checkpoint=DIR
  python -m clusterstm_jax.evaluate --config=configs/eval_qa.py --config.checkpoint=DIR
  python -m clusterstm_jax.evaluate --config=configs/eval_caption.py --config.checkpoint=DIR

DIR is an export (python -m clusterstm_jax.export) or a training run (its workdir, its
checkpoints/ dir or one step dir). It prints a table and writes JSON to --config.output
(default DIR/eval_<type>.json). Evaluators, chosen by `type` (EVALUATORS):
  retrieval  contrastive scores pick each query's top-k candidates, the matching (VTM) head
             re-ranks them (UMT); t2v and v2t R@1/5/10, MdR, MnR, and the contrastive-only ones;
  qa         open-ended VideoQA, answers ranked from the fixed answer list; top-1 accuracy;
  caption    greedy or beam decoding; BLEU-4, ROUGE-L, CIDEr.
This file binds a model to the model-free evaluators in evaluators/; fine-tuning runs call the
same code at their end through `config.evals` (train.run_evals -> run_evals).
"""
from __future__ import annotations

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clusterstm_jax import checkpointing
from clusterstm_jax import downstream
from clusterstm_jax import export as export_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import step as step_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data.tokenizer import Tokenizer
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import captioning
from clusterstm_jax.evaluators import metrics as metrics_lib
from clusterstm_jax.evaluators import qa as qa_lib
from clusterstm_jax.evaluators import retrieval
from clusterstm_jax.evaluators.retrieval import _global_rows  # host rows of every process

_MATCHING_TASKS = ('clusterstm', 'retrieval_ft', 'qa', 'caption')  # models with a VTM head


# --- loading ---

def load_model(checkpoint: str, data_dir: str = ''):
  """An export or a training checkpoint -> (run config, params, tokenizer, mesh).

  data_dir, if given, replaces the run's config.data.data_dir (data moved to another machine).
  """
  if not checkpoint:
    raise UserError('config.checkpoint is required: an export dir or a training checkpoint')
  if not os.path.exists(checkpoint):
    raise UserError(f'checkpoint not found: {checkpoint}')
  is_export = os.path.exists(os.path.join(checkpoint, 'config.json'))
  if is_export:
    config = export_lib.read_config(checkpoint)
  else:
    run_ckpts = os.path.join(checkpoint, 'checkpoints')
    ckpt_dir, step = checkpointing.resolve_checkpoint_path(
        run_ckpts if os.path.isdir(run_ckpts) else checkpoint)
    config = ml_collections.ConfigDict(checkpointing.restore_config(ckpt_dir, step))
  if data_dir:
    config.data.data_dir = data_dir
  mesh = sharding_lib.make_mesh(config.mesh)
  if not is_export:
    tokenizer = pipeline.get_tokenizer(config.data)
    return (config, step_lib.restore_params(config, ckpt_dir, step, mesh, tokenizer.vocab_size),
            tokenizer, mesh)
  tokenizer = Tokenizer(export_lib.tokenizer_path(checkpoint))
  task = step_lib.make_task(config, step_lib.TextSpec.from_tokenizer(tokenizer))
  boxed = step_lib.abstract_params(task.model, task.init_inputs)
  shardings = sharding_lib.tree_shardings(boxed, mesh, _rules(config))
  abstract = checkpointing.abstract_with_shardings(nn.unbox(boxed), shardings)
  return config, export_lib.read_params(checkpoint, abstract), tokenizer, mesh


def _rules(config):
  return sharding_lib.logical_rules(config.sharding_rules)


def _model(config, tokenizer, need: tuple[str, ...], evaluator: str):
  task = config.get('task', 'clusterstm')
  if task not in need:
    raise UserError(f'{evaluator} evaluation needs a model of task {" or ".join(need)}; this '
                    f'one is {task!r}')
  return step_lib.make_task(config, step_lib.TextSpec.from_tokenizer(tokenizer)).model


def _jit(fn, config, mesh):
  """jax.jit(fn) with a replicated output, traced and run under the mesh and axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(_rules(config)):
    jitted = jax.jit(fn, out_shardings=sharding_lib.replicated(mesh))

  def call(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(_rules(config)):
      return jitted(*args)
  return call


def _put(x: np.ndarray, sharding) -> jax.Array:
  """The same host array on every process -> one global array (multi-host safe)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _loader(config, ev, tokenizer, mesh):
  shards = sharding_lib.batch_size_per_shard(mesh)
  if ev.batch_size % shards:
    raise UserError(f'eval batch_size={ev.batch_size} is not a multiple of the {shards} '
                    'data-parallel shards')
  return pipeline.make_eval_loader(
      config.data, tokenizer, split=ev.split or None, global_batch_size=ev.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode=downstream.example_decoder(config))


# --- evaluators: (run config, evaluator config, params, tokenizer, mesh) -> (metrics, details) ---

def evaluate_retrieval(config, ev, params, tokenizer, mesh):
  """Both directions re-ranked: details are empty. Metrics keyed t2v_R@1 ..., itc_t2v_R@1 ..."""
  model = _model(config, tokenizer, _MATCHING_TASKS, 'retrieval')

  def encode(params, video, ids):
    apply = functools.partial(model.apply, {'params': params})
    video_feat, tokens = apply(step_lib.normalize_video(video), None, method=model.encode_video)
    text_feat, hidden = apply(ids, method=model.encode_text)
    return video_feat, tokens, text_feat, hidden

  def match_scores(params, tokens, hidden, ids, text_idx, video_idx):
    apply = functools.partial(model.apply, {'params': params})
    fused = apply(hidden[text_idx], ids[text_idx], tokens[video_idx], method=model.fuse)
    logits = apply(fused, method=model.vtm_logits)
    return logits[:, 1] - logits[:, 0]  # log-odds of a match (class 1)

  encode, match_scores = _jit(encode, config, mesh), _jit(match_scores, config, mesh)
  parts = []
  for batch in _loader(config, ev, tokenizer, mesh):
    arrays = sharding_lib.global_batch({'video': batch['video'], 'text': batch['text']}, mesh)
    valid = _global_rows(batch['valid'], mesh)
    host = [np.asarray(x) for x in encode(params, arrays['video'], arrays['text'])]
    host += [_global_rows(batch['text'], mesh), _global_rows(batch['index'], mesh)]
    parts.append([x[valid] for x in host])
  video_feat, tokens, text_feat, hidden, ids, index = map(np.concatenate, zip(*parts))
  order = np.argsort(index, kind='stable')
  if len(np.unique(index)) != len(index):
    raise RuntimeError('evaluation saw an example twice; the eval loader is misconfigured')
  video_feat, tokens, text_feat, hidden, ids = (
      x[order] for x in (video_feat, tokens, text_feat, hidden, ids))

  sim = retrieval.similarity(video_feat, text_feat)  # [texts, videos]; text i describes video i
  gt = np.arange(sim.shape[0])
  out = {f'itc_{k}': v for k, v in metrics_lib.t2v_v2t_metrics(sim, gt).items()}
  repl, pairs = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  tables = [_put(x, repl) for x in (tokens, hidden, ids)]  # on device once, gathered in jit
  shards = sharding_lib.batch_size_per_shard(mesh)
  if ev.rerank_batch_size % shards:
    raise UserError(f'rerank_batch_size={ev.rerank_batch_size} is not a multiple of the '
                    f'{shards} data-parallel shards')

  score = _PairScores(lambda t, v: np.asarray(match_scores(params, *tables, _put(t, pairs),
                                                          _put(v, pairs))),
                      ev.rerank_batch_size, num_videos=sim.shape[1])
  t2v = metrics_lib.rerank_topk(sim, score, ev.k)
  v2t = metrics_lib.rerank_topk(sim.T, lambda v, t: score(t, v), ev.k)
  out.update({f't2v_{k}': v for k, v in metrics_lib.retrieval_metrics(t2v, gt).items()})
  out.update({f'v2t_{k}': v for k, v in metrics_lib.retrieval_metrics(v2t, gt).items()})
  out['num_videos'] = float(sim.shape[1])
  return out, {}


class _PairScores:
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


def evaluate_qa(config, ev, params, tokenizer, mesh):
  """Top-1 accuracy over every question of the split, and per answer type (colour, ...)."""
  model = _model(config, tokenizer, ('qa',), 'VideoQA')
  answers = downstream.answer_table(tokenizer, config.data, config.qa.answer_len)

  def predict(params, video, questions):
    apply = functools.partial(model.apply, {'params': params})
    context, mask = apply(step_lib.normalize_video(video), questions, method=model.qa_context)
    decoder = lambda ids, c, m: apply(ids, c, m, method=model.decode_text)
    pred = qa_lib.predict_answers(decoder, context, mask, answers, k=ev.k,
                                  bos_id=tokenizer.cls_id, pad_id=tokenizer.pad_id)
    return pred.reshape(questions.shape[:2])

  predict = _jit(predict, config, mesh)
  records = []

  def batches():
    for batch in _loader(config, ev, tokenizer, mesh):
      g = {k: _global_rows(batch[k], mesh) for k in ('answer_idx', 'qa_mask', 'valid')}
      yield {'video': batch['video'], 'questions': batch['questions'],
             'answer_idx': g['answer_idx'], 'qa_valid': g['qa_mask'] & g['valid'][:, None]}

  def predict_fn(batch):
    arrays = sharding_lib.global_batch(
        {'video': batch['video'], 'questions': batch['questions']}, mesh)
    pred = np.asarray(predict(params, arrays['video'], arrays['questions']))
    records.append((pred.reshape(-1), batch['answer_idx'].reshape(-1),
                    batch['qa_valid'].reshape(-1)))
    return pred

  out = qa_lib.evaluate(batches(), predict_fn, answer_key='answer_idx', valid_key='qa_valid')
  pred, gold, valid = map(np.concatenate, zip(*records))
  kinds = np.asarray(downstream.answer_categories(config.data) + ['other'])  # gold -1: other
  for kind in dict.fromkeys(kinds):
    sel = valid & (kinds[gold] == kind)
    if sel.any():
      out[f'acc_{kind}'] = float(100.0 * np.mean(pred[sel] == gold[sel]))
  return out, {}


def evaluate_caption(config, ev, params, tokenizer, mesh):
  """BLEU-4, ROUGE-L, CIDEr; details: {'predictions': {id: str}, 'references': {id: [str]}}."""
  model = _model(config, tokenizer, ('caption',), 'captioning')
  max_len = downstream.decoder_len(config)

  def generate(params, video):
    apply = functools.partial(model.apply, {'params': params})
    context = apply(step_lib.normalize_video(video), method=model.caption_context)
    decoder = lambda ids, c, m: apply(ids, c, m, method=model.decode_text)
    ids, _ = captioning.decode_captions(
        decoder, context, None, max_len=max_len, bos_id=tokenizer.cls_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, beam_size=ev.beam_size,
        alpha=ev.alpha)
    return ids

  generate = _jit(generate, config, mesh)

  def batches():
    for batch in _loader(config, ev, tokenizer, mesh):
      yield {'video': batch['video'], 'index': _global_rows(batch['index'], mesh),
             'valid': _global_rows(batch['valid'], mesh)}

  caption_fn = lambda b: generate(params, sharding_lib.global_batch({'video': b['video']},
                                                                    mesh)['video'])
  predictions = captioning.generate_captions(batches(), caption_fn, tokenizer)
  source = pipeline.get_source(config.data, ev.split or config.data.eval_split)
  references = {}
  for i in range(len(source)):
    ex = source[i]
    if int(ex['id']) in predictions:
      references.setdefault(int(ex['id']), []).append(downstream.as_text(ex['caption']))
  metrics = captioning.evaluate_captions(predictions, references)
  return metrics, {'predictions': predictions, 'references': references}


EVALUATORS = {'retrieval': evaluate_retrieval, 'qa': evaluate_qa, 'caption': evaluate_caption}


def _evaluator(kind: str):
  if kind not in EVALUATORS:
    raise UserError(f'unknown evaluator type {kind!r}; known: {sorted(EVALUATORS)}')
  return EVALUATORS[kind]


def run_evals(config, params, tokenizer, mesh) -> dict[str, float]:
  """Every evaluator of config.evals ({name: {type, ...}}) -> {'name/metric': value}."""
  results = {}
  for name, ev in config.evals.items():
    metrics, _ = _evaluator(ev.type)(config, ev, params, tokenizer, mesh)
    results.update({f'{name}/{k}': float(v) for k, v in metrics.items()})
  return results


def format_results(results: dict) -> str:
  """Tables of {'name/metric': value} results, one block per evaluator name."""
  groups = {}
  for key, value in results.items():
    if '/' in key:
      name, metric = key.split('/', 1)
      groups.setdefault(name, {})[metric] = value
  lines = []
  for name, m in groups.items():
    if 't2v_R@1' in m:
      lines.append(f'{name}: text-video retrieval over {m.get("num_videos", 0):.0f} videos, '
                   'contrastive top-k re-ranked by the matching head:')
      lines.append(metrics_lib.format_table({k: v for k, v in m.items() if k[:4] in
                                             ('t2v_', 'v2t_')}))
      lines.append('contrastive scores only:')
      lines.append(metrics_lib.format_table({k[4:]: v for k, v in m.items()
                                             if k.startswith('itc_')}))
    elif 'acc' in m:
      kinds = ', '.join(f'{k[4:]} {v:.1f}' for k, v in m.items() if k.startswith('acc_'))
      lines.append(f'{name}: VideoQA top-1 accuracy {m["acc"]:.1f}% over '
                   f'{m["num_questions"]:.0f} questions ({kinds})')
    else:
      lines.append(f'{name}: ' + '  '.join(f'{k} {v:.1f}' for k, v in m.items()))
  return '\n'.join(lines)


# --- command line ---

def evaluate_checkpoint(eval_config) -> dict:
  """The CLI's work: evaluates eval_config.checkpoint, prints, writes and returns the JSON."""
  config, params, tokenizer, mesh = load_model(eval_config.checkpoint, eval_config.data_dir)
  ev = eval_config.eval
  metrics, details = _evaluator(ev.type)(config, ev, params, tokenizer, mesh)
  print(format_results({f'{ev.type}/{k}': v for k, v in metrics.items()}))
  out = {'checkpoint': os.path.abspath(eval_config.checkpoint),
         'task': config.get('task', 'clusterstm'),
         'split': ev.split or config.data.eval_split, 'eval': ev.to_dict(),
         'metrics': {k: float(v) for k, v in metrics.items()}}
  if 'predictions' in details:
    preds, refs = details['predictions'], details['references']
    out['samples'] = [{'id': i, 'prediction': preds[i], 'references': refs[i]}
                      for i in sorted(preds)[:eval_config.get('num_samples', 0)]]
    for s in out['samples']:
      print(f'  {s["id"]}: {s["prediction"]!r}  (reference: {s["references"][0]!r})')
  path = eval_config.output or os.path.join(eval_config.checkpoint, f'eval_{ev.type}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(out, f, indent=1)
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')
  return out


def main(argv) -> None:
  del argv
  from absl import flags
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    evaluate_checkpoint(flags.FLAGS.config)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  from clusterstm_jax import train
  config_flags.DEFINE_config_file('config', None, 'configs/eval_<type>.py', lock_config=True)
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=train.parse_flags_or_exit)  # a bad override: one line on stderr
