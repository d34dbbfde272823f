"""Mixed image and video batches (config.images): T = 1 batches, the image masking rule, exact
resume of both streams, and the image stream off by default."""
import json
import os

import jax
import numpy as np
import pytest

from configs import pretrain
from clusterstm_jax import config_lib
from clusterstm_jax import step as step_lib
from clusterstm_jax import train
from clusterstm_jax.data import pipeline
from clusterstm_jax.masking import dpc as dpc_lib
from clusterstm_jax.masking import strategies

pytestmark = pytest.mark.slow
TEACHER_DIRS = {}


@pytest.fixture(scope='module')
def data_dir(shared_smoke):
  # The session's tiny dataset and smoke teacher (conftest.py): the teacher trains on first use.
  data, teacher = shared_smoke
  TEACHER_DIRS[data] = teacher
  return data


def smoke_config(data_dir, arg='smoke,images', **overrides):
  config = pretrain.get_config(arg)
  config.data.data_dir = data_dir
  config.teacher.workdir = TEACHER_DIRS[data_dir]
  config.async_checkpointing = False
  return config_lib.with_overrides(config, **overrides)


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(workdir, key):
  return {r['step']: r[key] for r in rows(workdir) if key in r}


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, train.train_and_evaluate(smoke_config(data_dir), workdir)


# ------------------------------------------------------------------ (c) off by default, schedule

def test_images_off_by_default_and_schedule_unchanged():
  for arg in (None, 'smoke', 'mask=random'):
    config = pretrain.get_config(arg)
    assert config.images.every == 0 and config_lib.image_every(config) == 0
  config = pretrain.get_config(None)
  assert (config.total_steps, config.unmasked_steps, config.batch_size) == (180, 20, 64)
  kinds = [train.step_kind(config, s, 180) for s in range(180)]
  assert kinds == ['video'] * 160 + ['unmasked'] * 20
  assert train.examples_per_step(config) == 64

  on = pretrain.get_config('images')
  assert (on.images.every, on.images.name, on.images.split) == (2, 'shapes', 'train')
  kinds = [train.step_kind(on, s, 200) for s in range(200)]
  # Every 2nd step is an image step; unmasked tuning (the last 20) is video-only.
  assert kinds[:4] == ['video', 'image', 'video', 'image']
  assert kinds[180:] == ['unmasked'] * 20 and kinds.count('image') == 90
  data = pipeline.image_data_config(on)
  assert (data.name, data.num_frames, data.builder_config) == ('shapes', 1, 'default')

  paper = pretrain.get_config('paper')
  assert (paper.images.every, paper.images.name, paper.images.split) == (2, 'cc3m', 'train')
  assert pipeline.image_data_config(paper).builder_config == 'default'
  assert train.examples_per_step(paper) == 2048  # epochs then count videos + images


@pytest.mark.parametrize('field,value,match', [
    ('images.every', 1, 'images.every=1'),
    ('images.every', -2, 'images.every=-2'),
    ('images.batch_size', 12, 'images.batch_size=12 is not divisible by the 8'),
    ('images.batch_size', 0, 'images.batch_size=0'),
    ('images.split', '', 'images.split'),
])
def test_bad_image_settings_are_one_line_config_errors(field, value, match):
  config = pretrain.get_config('smoke,images')
  node, key = field.split('.')
  config[node][key] = value
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(config, num_devices=8, process_count=1)
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------ (a) T = 1 and the image rule

def test_image_step_has_t1_and_keeps_the_densest_token_per_cluster(data_dir, straight_run,
                                                                   monkeypatch):
  config = smoke_config(data_dir)
  image_config = pipeline.image_data_config(config)
  tokenizer = pipeline.get_tokenizer(config.data)
  loader = pipeline.make_train_loader(image_config, tokenizer, global_batch_size=8, seed=1,
                                      process_index=0, process_count=1)
  batch = next(iter(loader))
  s = config.data.image_size
  assert batch['video'].shape == (8, 1, s, s, 3) and batch['labels'].shape == (8, 1, s, s)

  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import teacher as teacher_lib
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = teacher_lib.load_teacher(config, mesh)  # trained by straight_run
  trainer = step_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                   teacher=teacher, text=step_lib.TextSpec.from_tokenizer(tokenizer))
  # What the step's loss masks with: spy on the masking call inside the loss, and return the
  # spied arrays from the same jitted trace (jit: eager dispatch is much slower here).
  seen = []
  real = strategies.mask_from_config

  def spy(mask_config, rng, shape, features=None):
    out = real(mask_config, rng, shape, features)
    seen.append((shape, features, out))
    return out

  def loss_and_mask(params, batch, tparams):
    loss, metrics = trainer.task.loss_fn(params, batch, jax.random.key(1), tparams)
    return loss, metrics, seen[-1][1], seen[-1][2]

  monkeypatch.setattr(strategies, 'mask_from_config', spy)
  state = trainer.init_state(jax.random.key(0))
  loss, metrics, features, mask = jax.jit(loss_and_mask)(
      jax.device_get(state['params']), batch, jax.device_get(teacher.params))
  assert np.isfinite(float(loss)) and float(metrics['mrm']) > 0
  assert len(seen) == 1
  shape = seen[0][0]
  # The jitted image step's own program (what train.py runs) takes T = 1 batches.
  assert f'tensor<8x1x{s}x{s}x3xui8>' in trainer.lower(8, image=True).as_text()
  h = s // step_lib.patch_size(config)
  n = h * h
  nc = strategies.num_keep(n, config.mask.ratio)
  assert shape == (8, 1, n) and features.shape[:3] == (8, 1, n)
  keep = np.asarray(mask.keep_idx)
  assert keep.shape == (8, 1, nc)
  assert all(len(set(row)) == nc for row in keep.reshape(8, nc).tolist())
  assert np.asarray(mask.keep_mask).sum(-1).tolist() == [[nc]] * 8

  # The image rule, from the masking package's own DPC: in every cluster, the token with the
  # highest DPC local density (ties: the lowest index).
  ref = dpc_lib.dpc_knn(np.asarray(features), nc, k=config.mask.dpc_k,
                        normalize=config.mask.normalize)
  assign, log_rho = np.asarray(ref.cluster_assign), np.asarray(ref.log_rho)
  np.testing.assert_array_equal(np.asarray(mask.clusters), assign)
  for b in range(8):
    picks = sorted(int(np.flatnonzero(assign[b, 0] == c)[np.argmax(
        log_rho[b, 0][assign[b, 0] == c])]) for c in range(nc))
    assert keep[b, 0].tolist() == picks, b
    assert sorted(assign[b, 0][keep[b, 0]].tolist()) == list(range(nc))  # one per cluster


@pytest.mark.parametrize('strategy', ['random', 'tube', 'clusterstm_random_pick'])
def test_other_strategies_keep_nc_at_t1(strategy):
  n, nc = 64, 10
  feats = jax.random.normal(jax.random.key(0), (4, 1, n, 8))
  out = strategies.compute_mask(strategy, jax.random.key(2), shape=(4, 1, n), num_keep=nc,
                                features=feats)
  keep = np.asarray(out.keep_idx)
  assert keep.shape == (4, 1, nc)
  assert all(len(set(r)) == nc and min(r) >= 0 and max(r) < n
             for r in keep.reshape(4, nc).tolist())


# ------------------------------------------------------------------ (b) exact resume, both streams

def test_smoke_run_with_images_logs_both_streams(straight_run):
  workdir, results = straight_run
  assert results['step'] == 6 and 'zeroshot_t2v_R@1' in results
  video, image = losses(workdir, 'loss'), losses(workdir, 'image/loss')
  assert sorted(video) == [1, 3, 5] and sorted(image) == [2, 4, 6]
  image_rows = [r for r in rows(workdir) if 'image/loss' in r]
  assert all('loss' not in r and 'image/mrm' in r for r in image_rows)
  # No temporal recurrence in a single frame.
  assert all(r['image/mask/temporal_recurrence'] == 0 for r in image_rows)
  ckpt = os.path.join(workdir, 'checkpoints', '6')
  assert {'state', 'data', 'image_data', 'config'} <= set(os.listdir(ckpt))


def test_exact_resume_of_both_streams(data_dir, straight_run, tmp_path):
  straight, _ = straight_run
  split = str(tmp_path / 'split')
  halted = train.train_and_evaluate(smoke_config(data_dir, halt_at_step=3), split)
  assert halted == {'step': 3, 'halted': True}
  train.train_and_evaluate(smoke_config(data_dir), split)
  for key in ('loss', 'image/loss', 'image/vtc', 'image/mrm'):
    a, b = losses(straight, key), losses(split, key)
    assert sorted(a) == sorted(b) and a, key
    for s in a:
      assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (key, s, a[s], b[s])
