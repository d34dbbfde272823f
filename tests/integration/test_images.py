"""Mixed image and video batches (config.images) in smoke runs: T = 1 batches and the image
masking rule, both streams logged, exact resume of both streams. (The image stream's config,
off by default: tests/unit/test_configs.py.)"""
import os

import jax
import numpy as np
import pytest

from clusterstm_jax import loop
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.masking import dpc as dpc_lib
from clusterstm_jax.masking import strategies
from clusterstm_jax.tasks import base as tasks_base
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARG = 'smoke,images'


@pytest.fixture(scope='module')
def straight_run(shared_smoke, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, loop.run(shared_smoke.config(ARG), workdir)


# ------------------------------------------------------------------ (a) T = 1 and the image rule

def test_image_step_has_t1_and_keeps_the_densest_token_per_cluster(shared_smoke, straight_run,
                                                                   monkeypatch):
  config = shared_smoke.config(ARG)
  image_config = pipeline.image_data_config(config)
  tokenizer = pipeline.get_tokenizer(config.data)
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import teacher as teacher_lib
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = teacher_lib.load_teacher(config, mesh)  # trained by straight_run
  loader = pipeline.make_train_loader(image_config, tokenizer, global_batch_size=8, seed=1,
                                      process_index=0, process_count=1,
                                      teacher_text=teacher.text_stream)
  batch = next(iter(loader))
  s = config.data.image_size
  assert batch['video'].shape == (8, 1, s, s, 3) and batch['labels'].shape == (8, 1, s, s)
  trainer = trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                   teacher=teacher, text=tasks_lib.TextSpec.from_tokenizer(tokenizer))
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
  h = s // tasks_base.patch_size(config)
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


# ------------------------------------------------------------------ (b) exact resume, both streams

def test_smoke_run_with_images_logs_both_streams(straight_run):
  workdir, results = straight_run
  assert results['step'] == 6 and 'zeroshot_t2v_R@1' in results
  video, image = helpers.losses(workdir, 'loss'), helpers.losses(workdir, 'image/loss')
  assert sorted(video) == [1, 3, 5] and sorted(image) == [2, 4, 6]
  image_rows = [r for r in helpers.metrics_rows(workdir) if 'image/loss' in r]
  assert all('loss' not in r and 'image/mrm' in r for r in image_rows)
  # No temporal recurrence in a single frame.
  assert all(r['image/mask/temporal_recurrence'] == 0 for r in image_rows)
  ckpt = os.path.join(workdir, 'checkpoints', '6')
  assert {'state', 'data', 'image_data', 'config'} <= set(os.listdir(ckpt))


def test_exact_resume_of_both_streams(shared_smoke, straight_run, tmp_path):
  straight, _ = straight_run
  split = str(tmp_path / 'split')
  halted = loop.run(shared_smoke.config(ARG, halt_at_step=3), split)
  assert halted == {'step': 3, 'halted': True}
  loop.run(shared_smoke.config(ARG), split)
  for key in ('loss', 'image/loss', 'image/vtc', 'image/mrm'):
    a, b = helpers.losses(straight, key), helpers.losses(split, key)
    assert sorted(a) == sorted(b) and a, key
    for s in a:
      assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (key, s, a[s], b[s])
