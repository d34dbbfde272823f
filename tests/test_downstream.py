"""Downstream tasks end to end at smoke sizes, through exported checkpoints.

A smoke ClusterSTM export (untrained: pretraining itself is tested in test_train.py; here only its
export matters) initialises retrieval, VideoQA and captioning fine-tunes (config.init) of 2 steps.
Each run is exported and evaluated with the two commands a user runs:

  python -m clusterstm_jax.export --workdir=RUN --out=DIR
  python -m clusterstm_jax.evaluate --config=configs/eval_<task>.py --config.checkpoint=DIR

and the export must give the figures the run computed from its own parameters at its end. The
slow tests check each evaluator against an independent computation with the model's own methods:
the full matching-head score matrix (retrieval), every answer's likelihood (QA), a Python
greedy-decoding loop and pycocoevalcap on the stored captions (captioning). All of them share
the module's runs, exports and evaluations.
"""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import eval_retrieval, eval_qa
from configs import finetune_caption, finetune_qa, finetune_retrieval, pretrain
from clusterstm_jax import downstream, evaluate, export, step as step_lib, train
from clusterstm_jax.data import pipeline, shapes
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import caption_metrics
from clusterstm_jax.evaluators import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name (= the evaluator's type and its configs/eval_<name>.py) -> (fine-tuning config, task)
TASKS = {'retrieval': (finetune_retrieval, 'retrieval_ft'),
         'qa': (finetune_qa, 'qa'),
         'caption': (finetune_caption, 'caption')}
EVAL_BATCH = 16  # the smoke fine-tunes' own evaluation batch: the command compiles the same code


def _python(*args):
  """A command in a fresh interpreter (same XLA flags and compilation cache as this session)."""
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('downstream')


@pytest.fixture(scope='module')
def pretrained(root):
  """(data_dir, export dir) of a smoke ClusterSTM at its initial parameters."""
  config = pretrain.get_config('smoke')
  config.data.data_dir = str(root / 'data')
  tokenizer = pipeline.get_tokenizer(config.data)  # builds the tiny shapes split on first use
  task = step_lib.make_task(config, step_lib.TextSpec.from_tokenizer(tokenizer))
  rng = jax.random.key(0)
  params = nn.unbox(jax.jit(task.model.init)({'params': rng, 'dropout': rng},
                                             *task.init_inputs)['params'])
  return config.data.data_dir, export.write_export(
      str(root / 'pretrain_export'), params, config, pipeline.tokenizer_path(config.data))


@pytest.fixture(scope='module')
def finetuned(pretrained, root):
  """{name: (the run's results, its workdir)}: 2 steps from the export, then its evaluation."""
  data_dir, init = pretrained
  runs = {}
  for name, (module, _) in TASKS.items():
    config = module.get_config('smoke,steps=2')
    config.data.data_dir = data_dir
    config.init = init
    config.async_checkpointing = False
    assert config.evals[name].batch_size == EVAL_BATCH
    workdir = str(root / f'ft_{name}')
    results = train.train_and_evaluate(config, workdir)
    assert results['step'] == 2
    runs[name] = results, workdir
  return runs


@pytest.fixture(scope='module')
def cli(finetuned, root):
  """{name: (export dir, evaluation JSON, evaluate's stdout)} from the two commands."""
  out = {}
  for name, (_, workdir) in finetuned.items():
    exported, output = str(root / f'export_{name}'), str(root / f'eval_{name}.json')
    r = _python('-m', 'clusterstm_jax.export', f'--workdir={workdir}', f'--out={exported}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'exported to {exported}' in r.stdout
    r = _python('-m', 'clusterstm_jax.evaluate', f'--config=configs/eval_{name}.py',
                f'--config.checkpoint={exported}', f'--config.output={output}',
                f'--config.eval.batch_size={EVAL_BATCH}',
                *(['--config.num_samples=1000'] if name == 'caption' else []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'wrote {output}' in r.stdout
    with open(output) as f:
      out[name] = exported, json.load(f), r.stdout
  return out


def test_three_tasks_through_exported_checkpoints(finetuned, cli):
  expected_keys = {
      'retrieval': {f'{p}{d}_{m}' for p in ('', 'itc_') for d in ('t2v', 'v2t')
                    for m in ('R@1', 'R@5', 'R@10', 'MdR', 'MnR')} | {'num_videos'},
      'qa': {'acc', 'num_questions'},
      'caption': {'BLEU-4', 'ROUGE-L', 'CIDEr'},
  }
  printed = {'retrieval': 'contrastive scores only:', 'qa': 'VideoQA top-1 accuracy',
             'caption': 'CIDEr'}
  for name, (exported, out, stdout) in cli.items():
    assert sorted(os.listdir(exported)) == ['config.json', 'params', 'tokenizer.model'], name
    assert out['task'] == TASKS[name][1] and out['split'] == 'test'
    metrics = out['metrics']
    assert expected_keys[name] <= set(metrics), name
    assert printed[name] in stdout
    # The export, in a fresh process, gives the figures the run computed from its own params.
    results = finetuned[name][0]
    for key, value in metrics.items():
      assert results[f'{name}/{key}'] == pytest.approx(value, abs=1e-6), (name, key)
  assert cli['retrieval'][1]['metrics']['num_videos'] == 64
  for key, value in cli['retrieval'][1]['metrics'].items():
    if 'R@' in key:
      assert 0 <= value <= 100
  assert cli['qa'][1]['metrics']['num_questions'] > 64
  assert 0 <= cli['qa'][1]['metrics']['acc'] <= 100
  assert len(cli['caption'][1]['samples']) == 64
  assert all(v >= 0 for v in cli['caption'][1]['metrics'].values())


def test_default_finetune_configs_drop_pretraining_only_settings():
  # The smoke configs used above turn these off anyway; the defaults must too (a default
  # fine-tune inheriting pretraining's unmasked_steps stopped at build time).
  for name, (module, task) in TASKS.items():
    config = module.get_config()
    assert config.task == task and config.get('unmasked_steps', 0) == 0, name
    assert 'teacher' not in config and 'mrm' not in config, name
    assert set(config.evals) == {name}, name


def test_pair_scores_compute_each_pair_once_in_static_chunks():
  calls = []

  def head(t, v):
    calls.append((t.copy(), v.copy()))
    return 10.0 * t + v

  sim = np.random.default_rng(0).normal(size=(3, 5))
  score = evaluate._PairScores(head, batch_size=4, num_videos=5)
  t2v = metrics_lib.rerank_topk(sim, score, 3)
  v2t = metrics_lib.rerank_topk(sim.T, lambda v, t: score(t, v), 2)
  direct = lambda t, v: 10.0 * t + v
  np.testing.assert_array_equal(t2v, metrics_lib.rerank_topk(sim, direct, 3))
  np.testing.assert_array_equal(
      v2t, metrics_lib.rerank_topk(sim.T, lambda v, t: direct(t, v), 2))
  assert all(len(t) == len(v) == 4 for t, v in calls)  # one static shape, padded
  top_t2v = {(t, int(v)) for t in range(3) for v in np.argsort(-sim[t], kind='stable')[:3]}
  top_v2t = {(int(t), v) for v in range(5) for t in np.argsort(-sim[:, v], kind='stable')[:2]}
  new_v2t = top_v2t - top_t2v
  assert new_v2t and len(new_v2t) < len(top_v2t)  # the sample shares some pairs
  # Each pair once: v2t computes only the pairs t2v did not.
  assert len(calls) == math.ceil(len(top_t2v) / 4) + math.ceil(len(new_v2t) / 4)
  seen = {(int(a), int(b)) for t, v in calls for a, b in zip(t, v)}
  assert seen == top_t2v | top_v2t



def _model(checkpoint):
  config, params, tokenizer, _ = evaluate.load_model(checkpoint)
  model = step_lib.make_task(config, step_lib.TextSpec.from_tokenizer(tokenizer)).model
  fn = lambda method: jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method))
  return config, params, tokenizer, model, fn


def _test_split(config, tokenizer, decode=pipeline.decode_example):
  """Every valid row of the test split's eval loader, in id order, as numpy arrays."""
  loader = pipeline.make_eval_loader(config.data, tokenizer, global_batch_size=16,
                                     process_index=0, process_count=1, decode=decode)
  rows = [{k: v[b['valid']] for k, v in b.items()} for b in loader]
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                    keepdims=True))


@pytest.mark.slow
def test_partial_init_loads_shared_params_and_reports(pretrained):
  data_dir, init = pretrained
  config = finetune_qa.get_config('smoke')
  config.data.data_dir = data_dir
  task = step_lib.make_task(config, step_lib.TextSpec(256))
  rngs = {'params': jax.random.key(3), 'dropout': jax.random.key(3)}
  params = nn.unbox(jax.jit(task.model.init)(rngs, *task.init_inputs)['params'])
  lines = []
  loaded = export.load_params_into(init, params, report=lines.append)
  with ocp.StandardCheckpointer() as ckptr:
    stored = traverse_util.flatten_dict(ckptr.restore(os.path.join(init, 'params')), sep='/')
  before = traverse_util.flatten_dict(params, sep='/')
  after = traverse_util.flatten_dict(loaded, sep='/')
  assert set(after) == set(before)
  for name, value in after.items():
    expected = stored[name] if name in stored else before[name]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=name)
  assert any(n.startswith('text_decoder/') for n in after)
  assert not any(n.startswith('text_decoder/') for n in stored)
  assert len(lines) == 1
  assert 'kept at init: text_decoder (' in lines[0] and 'not used: decoder (' in lines[0]
  # A model whose parameter has another shape cannot take the export: a one-line error.
  other = dict(params, text_proj={'kernel': params['text_proj']['kernel'][:, :3],
                                  'bias': params['text_proj']['bias'][:3]})
  with pytest.raises(UserError, match=r'parameter text_proj/bias has shape \(32,\) there but '
                                      r'\(3,\) in this model'):
    export.load_params_into(init, other)



@pytest.mark.slow
def test_retrieval_reranking_matches_the_full_matching_matrix(finetuned, cli):
  exported, out, _ = cli['retrieval']
  metrics = out['metrics']
  assert out['eval']['k'] >= metrics['num_videos']  # every candidate is re-ranked

  config, params, tokenizer, model, fn = _model(exported)
  data = _test_split(config, tokenizer)
  norm = step_lib.normalize_video(jnp.asarray(data['video']))
  video_feat, tokens = fn(model.encode_video)(params, norm, None)
  text_feat, hidden = fn(model.encode_text)(params, jnp.asarray(data['text']))
  sim = np.einsum('se,vte->sv', np.asarray(text_feat), np.asarray(video_feat))
  sim /= video_feat.shape[1]  # per-frame cosine similarities, averaged
  fuse, head = fn(model.fuse), fn(model.vtm_logits)
  n = sim.shape[0]
  scores = np.zeros((n, n))
  for t in range(n):  # the matching head on every (text, video) pair
    logits = np.asarray(head(params, fuse(params, jnp.repeat(hidden[t:t + 1], n, 0),
                                          jnp.repeat(data['text'][t:t + 1], n, 0), tokens)))
    scores[t] = logits[:, 1] - logits[:, 0]
  gt = np.arange(n)
  expected = {f'itc_{k}': v for k, v in metrics_lib.t2v_v2t_metrics(sim, gt).items()}
  expected.update({f't2v_{k}': v for k, v in metrics_lib.retrieval_metrics(scores, gt).items()})
  expected.update({f'v2t_{k}': v for k, v in metrics_lib.retrieval_metrics(scores.T, gt).items()})
  for key, value in expected.items():
    assert metrics[key] == pytest.approx(value), key

  # The training run's checkpoint (not an export) evaluates the same as its export.
  ec = eval_retrieval.get_config()
  ec.checkpoint = finetuned['retrieval'][1]
  ec.output = str(exported) + '_from_run.json'
  ec.eval.batch_size = EVAL_BATCH
  assert evaluate.evaluate_checkpoint(ec)['metrics'] == pytest.approx(metrics)


@pytest.mark.slow
def test_qa_answer_ranking_matches_every_answers_likelihood(cli):
  exported, out, _ = cli['qa']
  metrics = out['metrics']

  config, params, tokenizer, model, fn = _model(exported)
  data = _test_split(config, tokenizer, downstream.example_decoder(config))
  source = pipeline.get_source(config.data, 'test')
  vocab = list(shapes.ANSWER_VOCAB)
  for row, clip in enumerate(data['index']):  # the batch fields are the stored texts
    ex = source[int(clip)]
    n = len(ex['questions'])
    assert data['qa_mask'][row].sum() == n
    for q in range(n):
      assert tokenizer.decode(data['questions'][row, q]) == ex['questions'][q].decode()
      assert vocab[data['answer_idx'][row, q]] == ex['answers'][q].decode()
  # Independent ranking: every answer of the list scored by its full log-likelihood.
  answers = tokenizer.encode_batch(vocab, config.qa.answer_len)
  context_fn, decode_fn = fn(model.qa_context), fn(model.decode_text)
  right = total = 0
  for start in range(0, len(data['index']), 16):
    video = step_lib.normalize_video(jnp.asarray(data['video'][start:start + 16]))
    context, mask = context_fn(params, video, jnp.asarray(data['questions'][start:start + 16]))
    loglik = []
    for ids in answers:
      tiled = jnp.asarray(np.tile(ids, (context.shape[0], 1)))
      logp = _log_softmax(decode_fn(params, tiled, context, mask))[:, :-1]
      target = ids[1:]
      loglik.append(sum(logp[:, t, target[t]] for t in range(len(target)) if target[t]))
    pred = np.argmax(np.stack(loglik, 1), 1)
    gold = data['answer_idx'][start:start + 16].reshape(-1)
    valid = data['qa_mask'][start:start + 16].reshape(-1)
    right += int(np.sum((pred == gold) & valid))
    total += int(valid.sum())
  assert metrics['num_questions'] == total
  assert metrics['acc'] == pytest.approx(100.0 * right / total)

  # A clip with more questions than the batch holds: evaluation refuses, training samples.
  ex = source[0]
  kwargs = dict(tokenizer=tokenizer, num_frames=4, image_size=config.data.image_size,
                max_text_len=32, answers=shapes.ANSWER_VOCAB, max_questions=1,
                question_len=16, answer_len=4)
  with pytest.raises(UserError, match='more than qa.max_questions=1'):
    downstream.decode_qa_example(ex, rng=None, **kwargs)
  one = downstream.decode_qa_example(ex, rng=np.random.default_rng(0), **kwargs)
  q = [s.decode() for s in ex['questions']].index(tokenizer.decode(one['questions'][0]))
  assert vocab[one['answer_idx'][0]] == ex['answers'][q].decode()


@pytest.mark.slow
def test_captions_greedy_decoding_scores_and_beam_search(cli, tmp_path):
  exported, out, _ = cli['caption']
  preds = {s['id']: s['prediction'] for s in out['samples']}

  config, params, tokenizer, model, fn = _model(exported)
  source = pipeline.get_source(config.data, 'test')
  refs = {i: [source[i]['caption'].decode()] for i in range(len(source))}
  assert preds.keys() == refs.keys()
  assert out['metrics'] == pytest.approx(caption_metrics.caption_scores(preds, refs))
  # Greedy decoding by hand for the first clips.
  data = _test_split(config, tokenizer)
  context = fn(model.caption_context)(params, step_lib.normalize_video(
      jnp.asarray(data['video'][:4])))
  decode_fn, length = fn(model.decode_text), config.data.max_text_len
  ids = np.zeros((4, length), np.int32)
  ids[:, 0] = tokenizer.cls_id
  done = np.zeros(4, bool)
  for t in range(1, length):
    logits = np.array(decode_fn(params, jnp.asarray(ids), context, None))[:, t - 1]
    logits[:, tokenizer.pad_id] = -np.inf
    token = np.where(done, tokenizer.pad_id, logits.argmax(-1))
    ids[:, t] = token
    done |= token == tokenizer.eos_id
  for i in range(4):
    assert preds[int(data['index'][i])] == tokenizer.decode(ids[i])

  # Beam search through the command line.
  r = _python('-m', 'clusterstm_jax.evaluate', '--config=configs/eval_caption.py',
              f'--config.checkpoint={exported}', '--config.eval.beam_size=2',
              '--config.eval.alpha=0.6', f'--config.output={tmp_path / "beam.json"}')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'CIDEr' in r.stdout
  with open(tmp_path / 'beam.json') as f:
    beam = json.load(f)
  assert beam['eval']['beam_size'] == 2 and set(beam['metrics']) == set(out['metrics'])


@pytest.mark.slow
def test_bad_checkpoints_give_one_line_errors(pretrained, tmp_path):
  r = _python('-m', 'clusterstm_jax.evaluate', '--config=configs/eval_qa.py',
              f'--config.checkpoint={tmp_path / "missing"}')
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: checkpoint not found: {tmp_path / "missing"}']
  (tmp_path / 'empty').mkdir()
  ec = eval_retrieval.get_config()
  ec.checkpoint = str(tmp_path / 'empty')
  with pytest.raises(UserError, match='no finished checkpoint'):
    evaluate.evaluate_checkpoint(ec)
  ec = eval_qa.get_config()
  ec.checkpoint = pretrained[1]
  with pytest.raises(UserError, match="needs a model of task qa; this one is 'clusterstm'"):
    evaluate.evaluate_checkpoint(ec)
