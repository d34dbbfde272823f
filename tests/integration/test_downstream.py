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
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import eval_qa, eval_retrieval, finetune_qa
from clusterstm_jax import exports, loading, loop
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import pipeline, shapes
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import caption_metrics
from clusterstm_jax.evaluators import metrics as metrics_lib
from clusterstm_jax.tasks import base as tasks_base
from tests import helpers

pytestmark = pytest.mark.integration
TASKS = helpers.FINETUNES
EVAL_BATCH = 16  # the smoke fine-tunes' own evaluation batch: the command compiles the same code


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('downstream')


@pytest.fixture(scope='module')
def pretrained(root):
  """(data_dir, export dir) of a smoke ClusterSTM at its initial parameters."""
  config = helpers.smoke_config(data_dir=root / 'data')
  tokenizer = pipeline.get_tokenizer(config.data)  # builds the tiny shapes split on first use
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  rng = jax.random.key(0)
  params = nn.unbox(jax.jit(task.model.init)({'params': rng, 'dropout': rng},
                                             *task.init_inputs)['params'])
  return config.data.data_dir, exports.write_export(
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
    results = loop.run(config, workdir)
    assert results['step'] == 2
    runs[name] = results, workdir
  return runs


@pytest.fixture(scope='module')
def cli(finetuned, root):
  """{name: (export dir, evaluation JSON, evaluate's stdout)} from the two commands."""
  out = {}
  for name, (_, workdir) in finetuned.items():
    exported, output = str(root / f'export_{name}'), str(root / f'eval_{name}.json')
    r = helpers.run_python('-m', 'clusterstm_jax.export', f'--workdir={workdir}',
                           f'--out={exported}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'exported to {exported}' in r.stdout
    r = helpers.run_python('-m', 'clusterstm_jax.evaluate', f'--config=configs/eval_{name}.py',
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
    assert sorted(os.listdir(exported)) == ['config.json', 'manifest.json', 'params',
                                            'tokenizer.model'], name
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


def _model(checkpoint):
  config, params, tokenizer, _ = loading.load_model(checkpoint)
  model = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer)).model
  fn = lambda method: jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method))
  return config, params, tokenizer, model, fn


def _test_split(config, tokenizer, decode=pipeline.decode_example):
  """Every valid row of the test split's eval loader, in id order, as numpy arrays."""
  loader = pipeline.make_eval_loader(config.data, tokenizer, global_batch_size=16,
                                     process_index=0, process_count=1, decode=decode)
  rows = [{k: v[b['valid']] for k, v in b.items()} for b in loader]
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.slow
def test_partial_init_loads_shared_params_and_reports(pretrained):
  data_dir, init = pretrained
  config = finetune_qa.get_config('smoke')
  config.data.data_dir = data_dir
  task = tasks_lib.get(config, tasks_lib.TextSpec(256))
  rngs = {'params': jax.random.key(3), 'dropout': jax.random.key(3)}
  params = nn.unbox(jax.jit(task.model.init)(rngs, *task.init_inputs)['params'])
  lines = []
  loaded = exports.load_params_into(init, params, report=lines.append)
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
    exports.load_params_into(init, other)



@pytest.mark.slow
def test_retrieval_reranking_matches_the_full_matching_matrix(finetuned, cli):
  exported, out, _ = cli['retrieval']
  metrics = out['metrics']
  assert out['eval']['k'] >= metrics['num_videos']  # every candidate is re-ranked

  config, params, tokenizer, model, fn = _model(exported)
  data = _test_split(config, tokenizer)
  norm = tasks_base.normalize_video(jnp.asarray(data['video']))
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
  assert loading.evaluate_checkpoint(ec)['metrics'] == pytest.approx(metrics)


@pytest.mark.slow
def test_qa_answer_ranking_matches_every_answers_likelihood(cli):
  exported, out, _ = cli['qa']
  metrics = out['metrics']

  config, params, tokenizer, model, fn = _model(exported)
  data = _test_split(config, tokenizer, qa_data.qa_decoder(config))
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
    video = tasks_base.normalize_video(jnp.asarray(data['video'][start:start + 16]))
    context, mask = context_fn(params, video, jnp.asarray(data['questions'][start:start + 16]))
    loglik = []
    for ids in answers:
      tiled = jnp.asarray(np.tile(ids, (context.shape[0], 1)))
      logp = helpers.np_log_softmax(decode_fn(params, tiled, context, mask))[:, :-1]
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
    qa_data.decode_qa_example(ex, rng=None, **kwargs)
  one = qa_data.decode_qa_example(ex, rng=np.random.default_rng(0), **kwargs)
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
  scores = {k: out['metrics'][k] for k in ('BLEU-4', 'ROUGE-L', 'CIDEr')}
  assert scores == pytest.approx(caption_metrics.caption_scores(preds, refs))
  assert (out['metrics']['num_items'], out['metrics']['num_listed']) == (64, 64)  # no skips
  # Greedy decoding by hand for the first clips.
  data = _test_split(config, tokenizer)
  context = fn(model.caption_context)(params, tasks_base.normalize_video(
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
  r = helpers.run_python('-m', 'clusterstm_jax.evaluate', '--config=configs/eval_caption.py',
                         f'--config.checkpoint={exported}', '--config.eval.beam_size=2',
                         '--config.eval.alpha=0.6', f'--config.output={tmp_path / "beam.json"}')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'CIDEr' in r.stdout
  with open(tmp_path / 'beam.json') as f:
    beam = json.load(f)
  assert beam['eval']['beam_size'] == 2 and set(beam['metrics']) == set(out['metrics'])


@pytest.mark.slow
def test_bad_checkpoints_give_one_line_errors(pretrained, tmp_path):
  r = helpers.run_python('-m', 'clusterstm_jax.evaluate', '--config=configs/eval_qa.py',
                         f'--config.checkpoint={tmp_path / "missing"}')
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: checkpoint not found: {tmp_path / "missing"}']
  (tmp_path / 'empty').mkdir()
  ec = eval_retrieval.get_config()
  ec.checkpoint = str(tmp_path / 'empty')
  with pytest.raises(UserError, match='no finished checkpoint'):
    loading.evaluate_checkpoint(ec)
  ec = eval_qa.get_config()
  ec.checkpoint = pretrained[1]
  with pytest.raises(UserError, match="needs a model of task qa; this one is 'clusterstm'"):
    loading.evaluate_checkpoint(ec)
