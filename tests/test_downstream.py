"""Downstream tasks end to end at smoke sizes, through exported checkpoints.

A smoke teacher and a smoke pretraining run make an export; retrieval, VideoQA and captioning
are fine-tuned from it (config.init), exported, and evaluated with clusterstm_jax.evaluate.
Each evaluator's figures are checked against an independent computation with the model's own
methods: the full matching-head score matrix (retrieval), every answer's likelihood (QA), a
Python greedy-decoding loop and pycocoevalcap on the stored captions (captioning).
"""
import json
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

from configs import eval_caption, eval_qa, eval_retrieval
from configs import finetune_caption, finetune_qa, finetune_retrieval, pretrain
from clusterstm_jax import downstream, evaluate, export, step as step_lib, train
from clusterstm_jax.data import pipeline, shapes
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import caption_metrics
from clusterstm_jax.evaluators import metrics as metrics_lib

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('downstream')


@pytest.fixture(scope='module')
def pretrained(root):
  """(data_dir, export dir) of a 2-step smoke pretraining run with a 2-step smoke teacher."""
  config = pretrain.get_config('smoke,steps=2')
  config.data.data_dir = str(root / 'data')
  config.async_checkpointing = False
  config.warmup_steps = 1
  config.teacher.workdir = str(root / 'teacher')
  config.teacher.config = os.path.join(REPO, 'configs', 'teacher.py') + ':smoke,steps=2'
  train.train_and_evaluate(config, str(root / 'pretrain'))
  return config.data.data_dir, export.export_run(str(root / 'pretrain'))


def _finetune(module, pretrained, root, name):
  data_dir, init = pretrained
  config = module.get_config('smoke,steps=2')
  config.data.data_dir = data_dir
  config.init = init
  config.async_checkpointing = False
  workdir = str(root / name)
  results = train.train_and_evaluate(config, workdir)
  assert results['step'] == 2
  return results, export.export_run(workdir)


def _evaluate(module, checkpoint, output, **eval_overrides):
  ec = module.get_config()
  ec.checkpoint, ec.output = checkpoint, str(output)
  ec.eval.update(eval_overrides)
  out = evaluate.evaluate_checkpoint(ec)
  with open(output) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  return out


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


def test_retrieval_finetune_and_reranked_evaluation(pretrained, root, tmp_path):
  results, exported = _finetune(finetune_retrieval, pretrained, root, 'ft_retrieval')
  for key in ('retrieval/t2v_R@1', 'retrieval/v2t_MnR', 'retrieval/itc_t2v_R@1'):
    assert key in results
  # k = every candidate: the re-ranked order is the matching head's order over the whole split.
  out = _evaluate(eval_retrieval, exported, tmp_path / 'r.json', k=1000, rerank_batch_size=64)
  metrics = out['metrics']
  assert metrics['num_videos'] == 64

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

  # The training run's checkpoint evaluates the same as its export.
  from_ckpt = _evaluate(eval_retrieval, str(root / 'ft_retrieval'), tmp_path / 'c.json',
                        k=1000, rerank_batch_size=64)
  assert from_ckpt['metrics'] == pytest.approx(metrics)


def test_qa_finetune_and_answer_ranking(pretrained, root, tmp_path):
  results, exported = _finetune(finetune_qa, pretrained, root, 'ft_qa')
  assert 0 <= results['qa/acc'] <= 100
  out = _evaluate(eval_qa, exported, tmp_path / 'qa.json')
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


def test_caption_finetune_decoding_and_scores(pretrained, root, tmp_path):
  results, exported = _finetune(finetune_caption, pretrained, root, 'ft_caption')
  assert results['caption/CIDEr'] >= 0
  ec_output = tmp_path / 'cap.json'
  ec = eval_caption.get_config()
  ec.checkpoint, ec.output, ec.num_samples = exported, str(ec_output), 1000
  out = evaluate.evaluate_checkpoint(ec)
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
  r = _cli(f'--config.checkpoint={exported}', '--config.eval.beam_size=2',
           '--config.eval.alpha=0.6', f'--config.output={tmp_path / "beam.json"}',
           config_file='configs/eval_caption.py')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'CIDEr' in r.stdout
  with open(tmp_path / 'beam.json') as f:
    beam = json.load(f)
  assert beam['eval']['beam_size'] == 2 and set(beam['metrics']) == set(out['metrics'])


def _cli(*args, config_file):
  return subprocess.run([sys.executable, '-m', 'clusterstm_jax.evaluate',
                         f'--config={config_file}', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_bad_checkpoints_give_one_line_errors(pretrained, tmp_path):
  r = _cli(f'--config.checkpoint={tmp_path / "missing"}', config_file='configs/eval_qa.py')
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
