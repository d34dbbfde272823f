"""Downstream on real-dataset layouts (tiny fixtures made here, as tests/unit/builder_fixtures.py
makes them), through the commands a user runs: zero-shot evaluation of a pretraining export on
MSR-VTT 1k-A, DiDeMo and ActivityNet Captions; retrieval fine-tuning on every (video, caption)
pair; MSRVTT-QA and MSVD-QA fine-tune -> export -> evaluate with the answer list; captioning
scored against every reference.

The pretraining export is a smoke ClusterSTM at its initial parameters (pretraining itself is
tested in test_train.py) with the tiny shapes tokenizer; every dataset here is built by the run
or the evaluation that first names it (8 frames, short side 224: the builders' defaults).
"""
import json
import os

import flax.linen as nn
import jax
import pytest

from configs import eval_retrieval, finetune_caption, finetune_qa, finetune_retrieval
from clusterstm_jax import exports, loading, loop
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.evaluators import caption_metrics
from tests import helpers
from tests.unit.builder_fixtures import didemo_fixture, write_json, write_text, write_video

pytestmark = pytest.mark.integration

# MSR-VTT: video -> split and captions (video3 has none); video9 is listed but not downloaded.
MSRVTT_SPLIT = {0: 'train', 1: 'train', 2: 'train', 3: 'train', 4: 'train', 5: 'validate',
                6: 'test', 7: 'test', 8: 'test'}
MSRVTT_CAPTIONS = {v: [] if v == 3 else [f'a {c} shape moves in clip {v} take {k}'
                                         for k, c in enumerate(('red', 'blue', 'green', 'big'))]
                   for v in MSRVTT_SPLIT}
TEST_1KA = {6: 'a red circle', 7: 'a blue square', 8: 'a green shape', 9: 'not downloaded'}


TRAIN_ANSWERS = ('dog', 'dog', 'dog', 'man', 'man', 'car')  # per video: 3 answers by frequency
TEST_ANSWERS = ('dog', 'man', 'cat')  # 'cat' is no training answer: out of the list


def _qa(videos, answers, id0=0, extra=()):
  """QA entries: per video, one question per answer of `answers`, the question words cycling
  over what/who/how; `extra` entries appended."""
  out, n = [], id0
  for v in videos:
    for q, answer in enumerate(answers):
      word = ('what', 'who', 'how')[q % 3]
      out.append({'question': f'{word} is in clip {v} number {q}', 'answer': answer,
                  'video_id': v, 'id': n})
      n += 1
  return out + list(extra)


def _msrvtt(root):
  for v in MSRVTT_SPLIT:
    write_video(root / 'videos' / 'all' / f'video{v}.mp4', v)
  write_json(root / 'train_val_videodatainfo.json', {
      'videos': [{'video_id': f'video{v}', 'split': s, 'id': v} for v, s in MSRVTT_SPLIT.items()
                 if s != 'test'],
      'sentences': [{'video_id': f'video{v}', 'caption': c} for v, cs in MSRVTT_CAPTIONS.items()
                    for c in cs if MSRVTT_SPLIT[v] != 'test']})
  write_json(root / 'test_videodatainfo.json', {
      'videos': [{'video_id': f'video{v}', 'split': 'test', 'id': v} for v, s in
                 MSRVTT_SPLIT.items() if s == 'test'],
      'sentences': [{'video_id': f'video{v}', 'caption': c} for v, cs in MSRVTT_CAPTIONS.items()
                    for c in cs if MSRVTT_SPLIT[v] == 'test']})
  write_text(root / 'msrvtt_data' / 'MSRVTT_train.9k.csv',
             'video_id\n' + ''.join(f'video{v}\n' for v in range(5)))
  write_text(root / 'msrvtt_data' / 'MSRVTT_JSFUSION_test.csv', 'key,vid_key,video_id,sentence\n'
             + ''.join(f'ret{v},msr{v},video{v},{s}\n' for v, s in TEST_1KA.items()))
  write_json(root / 'qa' / 'train_qa.json', _qa(range(5), TRAIN_ANSWERS))
  write_json(root / 'qa' / 'val_qa.json', _qa([5], TEST_ANSWERS, 100))
  write_json(root / 'qa' / 'test_qa.json', _qa([6, 7, 8], TEST_ANSWERS, 200, extra=[
      {'question': 'what is odd', 'answer': 'zebra', 'video_id': 7, 'id': 299}]))


def _msvd(root):
  clips = {i: f'clip{i}_1_5' for i in range(1, 7)}
  write_text(root / 'youtube_mapping.txt', ''.join(f'{c} vid{i}\n' for i, c in clips.items()))
  for i, c in clips.items():
    write_video(root / 'YouTubeClips' / f'{c}.avi', i)
  for split, ids in (('train', (1, 2, 3)), ('val', (4,)), ('test', (5, 6))):
    write_text(root / f'{split}_list.txt', ''.join(f'{clips[i]}\n' for i in ids))
  write_text(root / 'AllVideoDescriptions.txt', '# MSVD\n' + ''.join(
      f'{c} clip {i} caption {k}\n' for i, c in clips.items() for k in range(1 + i % 3)))
  write_json(root / 'qa' / 'train_qa.json', _qa((1, 2, 3), TRAIN_ANSWERS))
  write_json(root / 'qa' / 'val_qa.json', _qa((4,), TEST_ANSWERS, 100))
  write_json(root / 'qa' / 'test_qa.json', _qa((5, 6), TEST_ANSWERS, 200, extra=[
      {'question': 'who is odd', 'answer': 'zebra', 'video_id': 6, 'id': 299}]))


def _activitynet(root):
  for v in range(3):
    write_video(root / 'videos' / f'v_A{v}.mp4', v)
  for split, vs in (('train', (0,)), ('val_1', (1, 2))):
    write_json(root / f'{split}.json', {f'v_A{v}': {
        'duration': 1.0, 'timestamps': [[0.0, 0.5], [0.5, 1.0]],
        'sentences': [f'first event of {v}.', f'second event of {v}.']} for v in vs})


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """(data_dir, pretraining export dir) with every dataset's files in data_dir/manual/."""
  root = tmp_path_factory.mktemp('real')
  data = root / 'data'
  _msrvtt(data / 'manual' / 'msrvtt')
  _msvd(data / 'manual' / 'msvd')
  didemo_fixture(data / 'manual' / 'didemo', n=3)
  _activitynet(data / 'manual' / 'activitynet')
  config = helpers.smoke_config(data_dir=data)
  tokenizer = pipeline.get_tokenizer(config.data)  # builds the tiny shapes split
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  rng = jax.random.key(0)
  params = nn.unbox(jax.jit(task.model.init)({'params': rng, 'dropout': rng},
                                             *task.init_inputs)['params'])
  export = exports.write_export(str(root / 'pretrain_export'), params, config,
                                pipeline.tokenizer_path(config.data))
  return str(data), export


def _evaluate(*args):
  r = helpers.run_python('-m', 'clusterstm_jax.evaluate', *args)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_zero_shot_msrvtt_1ka_from_a_pretraining_export(world, tmp_path):
  data_dir, export = world
  out = tmp_path / 'msrvtt.json'
  stdout = _evaluate('--config=configs/eval_retrieval.py', f'--config.checkpoint={export}',
                     '--config.data.name=msrvtt', '--config.data.builder_config=1ka',
                     f'--config.data.data_dir={data_dir}', f'--config.output={out}',
                     '--config.eval.batch_size=8')
  assert 'text-video retrieval over 3 videos' in stdout
  assert 'over 3 of 4 test items (1 skipped by the build)' in stdout
  result = json.loads(out.read_text())
  assert (result['dataset'], result['builder_config'], result['split']) == ('msrvtt', '1ka',
                                                                             'test')
  assert result['metrics']['num_items'] == 3 and result['metrics']['num_listed'] == 4
  for key, value in result['metrics'].items():
    if 'R@' in key:
      assert 0 <= value <= 100


@pytest.mark.parametrize('name,split,n', [('didemo', 'test', 3), ('activitynet', 'val_1', 2)])
def test_zero_shot_paragraph_retrieval(world, tmp_path, name, split, n):
  data_dir, export = world
  ec = eval_retrieval.get_config()
  ec.checkpoint, ec.output = export, str(tmp_path / f'{name}.json')
  ec.data.name, ec.data.data_dir = name, data_dir
  ec.eval.batch_size = 8
  result = loading.evaluate_checkpoint(ec)
  assert result['split'] == split  # ActivityNet's benchmark split is val_1
  assert result['metrics']['num_videos'] == n == result['metrics']['num_items']


def test_retrieval_trains_on_every_video_caption_pair(world, tmp_path, capsys):
  data_dir, export = world
  config = finetune_retrieval.get_config('smoke,data=msrvtt')
  config.data.data_dir = data_dir
  config.update(init=export, async_checkpointing=False, batch_size=8, total_steps=-1,
                total_epochs=1.0)
  config.evals.retrieval.batch_size = 8
  source = pipeline.train_source(config.data, 'captions')
  pairs = sum(len(MSRVTT_CAPTIONS[v]) for v in range(5))
  assert len(source) == pairs == 16
  assert sorted(source[j]['caption'].decode() for j in range(len(source))) == sorted(
      c for v in range(5) for c in MSRVTT_CAPTIONS[v])
  printed = capsys.readouterr().out
  assert 'msrvtt train: 16 (video, caption) pairs from 4 videos; 1 videos without a caption ' \
         'left out' in printed
  results = loop.run(config, str(tmp_path / 'run'))
  assert results['step'] == 2  # one epoch = 16 pairs / 8 (the 5 videos would be 1 step)
  assert results['retrieval/num_items'] == 3
  # Run again: the finished run restores its checkpoint, data iterator included, and says so.
  assert loop.run(config, str(tmp_path / 'run')) == results
  assert 'run already complete' in capsys.readouterr().out
  config.data.captions = 'sample'
  sampled = pipeline.train_source(config.data, 'captions')
  assert len(sampled) == 4  # one example per captioned video


@pytest.mark.parametrize('name', ['msrvtt', 'msvd'])
def test_qa_build_finetune_export_evaluate_with_the_answer_list(world, tmp_path, name):
  data_dir, export = world
  config = finetune_qa.get_config(f'smoke,steps=2,data={name}')
  config.data.data_dir = data_dir
  config.qa.num_answers = 3
  config.update(init=export, async_checkpointing=False, batch_size=8)
  config.evals.qa.batch_size = 8
  workdir = str(tmp_path / 'run')
  results = loop.run(config, workdir)
  assert qa_data.answer_list(config) == ('dog', 'man', 'car')  # the most frequent 3
  train = pipeline.train_source(config.data, 'questions', announce=False)
  assert len(train) == (30 if name == 'msrvtt' else 18)  # every training question
  exported = str(tmp_path / 'export')
  r = helpers.run_python('-m', 'clusterstm_jax.export', f'--workdir={workdir}',
                         f'--out={exported}')
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / 'qa.json'
  stdout = _evaluate('--config=configs/eval_qa.py', f'--config.checkpoint={exported}',
                     f'--config.output={out}', '--config.eval.batch_size=8')
  metrics = json.loads(out.read_text())['metrics']
  with open(os.path.join(data_dir, 'manual', name, 'qa', 'test_qa.json')) as f:
    test = json.load(f)
  out_of_list = [q for q in test if q['answer'] not in ('dog', 'man', 'car')]
  # Every test question counts; those whose answer is outside the list ('cat', 'zebra') are
  # wrong whatever the model says.
  assert metrics['num_questions'] == len(test)
  assert metrics['num_out_of_list'] == len(out_of_list) >= 3
  assert metrics['acc'] <= 100.0 * (len(test) - len(out_of_list)) / len(test) + 1e-9
  assert metrics['num_answers'] == 3
  assert {'acc_what', 'acc_who'} <= set(metrics)
  assert 'answers ranked from a list of 3; ' in stdout and 'counted wrong' in stdout
  for key, value in metrics.items():
    if key.startswith('acc'):
      assert results[f'qa/{key}'] == pytest.approx(value, abs=1e-6)


def test_captioning_is_scored_against_every_reference(world, tmp_path):
  data_dir, export = world
  config = finetune_caption.get_config('smoke,steps=2,data=msrvtt')
  config.data.data_dir = data_dir
  config.update(init=export, async_checkpointing=False, batch_size=8)
  config.evals.caption.batch_size = 8
  workdir = str(tmp_path / 'run')
  loop.run(config, workdir)
  out = tmp_path / 'caption.json'
  _evaluate('--config=configs/eval_caption.py', f'--config.checkpoint={workdir}',
            f'--config.output={out}', '--config.num_samples=100', '--config.eval.batch_size=8')
  result = json.loads(out.read_text())
  preds = {s['id']: s['prediction'] for s in result['samples']}
  # References straight from the annotation files: every caption of each test video.
  source = pipeline.get_source(config.data, 'test')
  refs = {i: MSRVTT_CAPTIONS[int(source[i]['video_id'].decode()[5:])] for i in preds}
  assert all(len(r) == 4 for r in refs.values()) and len(preds) == 3
  assert [s['references'] for s in result['samples']] == [refs[i] for i in sorted(preds)]
  assert result['metrics']['BLEU-4'] == pytest.approx(
      caption_metrics.caption_scores(preds, refs)['BLEU-4'])
  assert result['metrics']['CIDEr'] == pytest.approx(
      caption_metrics.caption_scores(preds, refs)['CIDEr'])


@pytest.mark.parametrize('k', [0, 8])
def test_msvd_retrieval_ranks_every_caption(world, tmp_path, k):
  data_dir, export = world
  ec = eval_retrieval.get_config()
  ec.checkpoint, ec.output = export, str(tmp_path / 'msvd.json')
  ec.data.name, ec.data.data_dir = 'msvd', data_dir
  ec.eval.update(batch_size=8, k=k)
  result = loading.evaluate_checkpoint(ec)
  # Test clips 5 and 6 have 1 + i % 3 captions: 3 + 1 text queries, 2 video candidates.
  assert result['metrics']['num_texts'] == 4
  for key, value in result['metrics'].items():
    if key.startswith('t2v_R@'):
      assert value % 25 == 0  # over 4 queries
    if key.startswith('v2t_R@'):
      assert value % 50 == 0  # over 2 queries
