"""clusterstm_jax.load(): the README's example as written, and each method against the model's
own functions, on untrained smoke exports (only the loading and the plumbing matter here).

The README block runs in a fresh interpreter from a directory holding `exports/pretrain`.
embed_video/embed_text/similarity must give the retrieval evaluator's contrastive scores;
answer() must pick the answer of highest likelihood under the decoder (an independent numpy
computation over every answer); caption() must be a Python greedy-decoding loop's caption.
"""
import os
import re
import subprocess
import sys

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clusterstm_jax
from configs import finetune_caption, finetune_qa
from clusterstm_jax import exports, loop
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import pipeline, shapes, video_io
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import retrieval
from clusterstm_jax.tasks import base as tasks_base
from tests import helpers

pytestmark = pytest.mark.integration


def _export(config, out):
  tokenizer = pipeline.get_tokenizer(config.data)  # builds the tiny shapes split on first use
  task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
  rng = jax.random.key(1)
  params = nn.unbox(jax.jit(task.model.init)({'params': rng, 'dropout': rng},
                                             *task.init_inputs)['params'])
  return exports.write_export(str(out), params, config, pipeline.tokenizer_path(config.data))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('api')
  config = helpers.smoke_config(data_dir=root / 'data')
  _export(config, root / 'exports' / 'pretrain')
  return root


def _clips(n):
  return [shapes.generate_clip(np.random.default_rng(i)) for i in range(n)]


def _readme_block(title):
  """The ```python block that follows the README heading `title`."""
  with open(os.path.join(helpers.REPO, 'README.md')) as f:
    text = f.read()
  section = text[text.index(title):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_example_runs_as_written(root):
  code = _readme_block('## Using a model from Python')
  assert len(code.strip().splitlines()) <= 10
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  r = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  best = [int(x) for x in re.findall(r'\d+', r.stdout.strip().splitlines()[-1])]
  assert len(best) == 4 and all(0 <= b < 4 for b in best)


def _write_mp4(path, frames):
  with av.open(str(path), 'w') as c:
    s = c.add_stream('libx264', rate=8)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def test_embeddings_are_the_retrieval_evaluators(root, tmp_path):
  model = clusterstm_jax.load(str(root / 'exports' / 'pretrain'), batch_size=3)
  clips = _clips(5)  # 5 rows at batch 3 (rounded up to the 8 devices): one padded batch
  frames = np.stack([c['frames'] for c in clips])
  captions = [c['caption'] for c in clips]
  v, t = model.embed_video(frames), model.embed_text(captions)
  assert v.shape == (5, model.config.model.embed_dim) and t.shape == (5, v.shape[1])
  np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)

  # The model's own methods on the eval loader's frames, scored by the retrieval evaluator.
  task = model.task
  apply = lambda method, *a: task.model.apply({'params': model.params}, *a, method=method)
  video = np.stack([pipeline.eval_frames(f, model.num_frames, model.image_size) for f in frames])
  per_frame, _ = apply(task.model.encode_video, tasks_base.normalize_video(jnp.asarray(video)),
                       None)
  text, _ = apply(task.model.encode_text, jnp.asarray(
      model.tokenizer.encode_batch(captions, model.config.data.max_text_len)))
  expected = retrieval.similarity(np.asarray(per_frame), np.asarray(text))
  np.testing.assert_allclose(model.similarity(t, v), expected, atol=1e-5)
  np.testing.assert_allclose(model.similarity(captions, frames), expected, atol=1e-5)
  # One clip's frames [T,H,W,3] is a batch of one.
  np.testing.assert_allclose(model.embed_video(frames[2]), v[2:3], atol=1e-5)

  # Video files, decoded with PyAV: the same as their decoded frames.
  paths = []
  for i, f in enumerate(frames[:2]):
    paths.append(str(tmp_path / f'clip{i}.mp4'))
    _write_mp4(paths[-1], f)
  decoded = np.stack([video_io.read_video_frames(p, model.num_frames) for p in paths])
  np.testing.assert_allclose(model.embed_video(paths), model.embed_video(decoded), atol=1e-6)
  with pytest.raises(UserError, match="answer\\(\\) needs a fine-tune of task 'qa'"):
    model.answer(frames[:1], ['what colour is the circle?'])
  with pytest.raises(UserError, match='video file not found'):
    model.embed_video([str(tmp_path / 'missing.mp4')])


def _finetune_export(module, root, name):
  config = module.get_config('smoke')
  config.data.data_dir = str(root / 'data')
  return clusterstm_jax.load(_export(config, root / 'exports' / name), batch_size=2)


def test_answer_is_the_most_likely_answer(root):
  model = _finetune_export(finetune_qa, root, 'qa')
  clips = _clips(3)
  frames = np.stack([c['frames'] for c in clips])
  questions = [c['questions'][0] for c in clips]
  answers = ['red', 'blue', 'circle', 'square', 'two']
  got = model.answer(frames, questions, answers)
  assert len(got) == 3 and set(got) <= set(answers)

  task, params, tok, qa = model.task, model.params, model.tokenizer, model.config.qa
  video = tasks_base.normalize_video(jnp.asarray(model.videos(frames)))
  ids = tok.encode_batch(questions, qa.question_len)[:, None]
  context, mask = task.model.apply({'params': params}, video, jnp.asarray(ids),
                                   method=task.model.qa_context)
  table = tok.encode_batch(answers, qa.answer_len)
  for row in range(len(clips)):
    scores = []
    for a in table:  # log p(answer | question, video) token by token, in numpy
      logits = np.asarray(task.model.apply(
          {'params': params}, jnp.asarray(a[None]), context[row:row + 1], mask[row:row + 1],
          method=task.model.decode_text), np.float64)[0]
      logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      scores.append(sum(logp[i - 1, a[i]] for i in range(1, len(a)) if a[i] != tok.pad_id))
    assert got[row] == answers[int(np.argmax(scores))]


def test_caption_is_greedy_decoding(root):
  model = _finetune_export(finetune_caption, root, 'caption')
  frames = np.stack([c['frames'] for c in _clips(2)])
  got = model.caption(frames)
  task, params, tok = model.task, model.params, model.tokenizer
  video = tasks_base.normalize_video(jnp.asarray(model.videos(frames)))
  context = task.model.apply({'params': params}, video, method=task.model.caption_context)
  length = model.config.data.max_text_len
  for row in range(2):
    ids = np.zeros((1, length), np.int32)
    ids[0, 0] = tok.cls_id
    for t in range(1, length):
      logits = np.asarray(task.model.apply({'params': params}, jnp.asarray(ids),
                                           context[row:row + 1], None,
                                           method=task.model.decode_text))[0, t - 1].copy()
      logits[tok.pad_id] = -np.inf
      ids[0, t] = int(np.argmax(logits))
      if ids[0, t] == tok.eos_id:
        break
    assert got[row] == tok.decode(ids[0])


def test_portable_exports_from_the_command_load_like_the_orbax_one(root):
  """A 2-step run exported three ways by the command; load() gives the same embeddings."""
  config = helpers.teacherless_config(total_steps=2, data_dir=root / 'data')
  workdir = str(root / 'run')
  loop.run(config, workdir)
  models = {}
  for fmt in ('orbax', 'safetensors', 'npz'):
    out = str(root / f'export_{fmt}')
    r = helpers.run_python('-m', 'clusterstm_jax.export', f'--workdir={workdir}', f'--out={out}',
                           f'--format={fmt}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'exported to {out}' in r.stdout
    models[fmt] = clusterstm_jax.load(out)
  assert sorted(os.listdir(root / 'export_safetensors')) == [
      'config.json', 'model.safetensors', 'tokenizer.model']
  clips = _clips(3)
  frames, captions = np.stack([c['frames'] for c in clips]), [c['caption'] for c in clips]
  want = models['orbax'].similarity(captions, frames)
  for fmt in ('safetensors', 'npz'):
    np.testing.assert_array_equal(models[fmt].similarity(captions, frames), want, err_msg=fmt)
