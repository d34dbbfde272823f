"""The offline teacher pass and training from its cache, on 16 tiny shapes clips with a random
teacher: the cached step's loss is the live step's, a killed pass resumes, processes split the
shards, and a resumed loader reads the same views."""
import os

import jax
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import teacher_cache as cache_lib
from clusterstm_jax.tools import teacher_cache as tool
from tests import helpers

pytestmark = pytest.mark.integration

N = 16  # examples: one batch of the smoke config


@pytest.fixture(scope='module')
def setup(shared_smoke, tmp_path_factory):
  config = shared_smoke.config()
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = helpers.random_teacher(mesh, helpers.SHAPES_VOCAB)
  train = pipeline.train_source(config.data, 'captions', announce=False)
  source = [train[j] for j in range(N)]
  tokenizer = pipeline.get_tokenizer(config.data)
  root = tmp_path_factory.mktemp('cache')
  return config, teacher, source, tokenizer, root


def _pass(setup, path, views, **kwargs):
  config, teacher, source, tokenizer, _ = setup
  return tool.run_pass(config, teacher, str(path), views=views, source=source,
                       tokenizer=tokenizer, shard_size=4, batch_size=8, **kwargs)


def _loader(setup, path):
  config, _, source, tokenizer, _ = setup
  cached = config_lib.with_overrides(config, **{'teacher.cache': str(path)})
  src, dec = cache_lib.for_training(str(path), teacher_lib.cache_fingerprint(cached), source,
                                    pipeline.decode_example)
  return cached, pipeline.make_train_loader(
      cached.data, tokenizer, global_batch_size=N, seed=0, process_index=0, process_count=1,
      decode=dec, source=src)


def test_cached_step_loss_equals_live_step_loss(setup):
  config, teacher, _, _, root = setup
  stats = _pass(setup, root / 'k1', views=1)
  assert stats['shards'] == 4 and stats['clip_views'] == N and stats['missing'] == 0
  cached_config, loader = _loader(setup, root / 'k1')
  batch = next(iter(loader))
  live_batch = {k: v for k, v in batch.items() if k not in cache_lib.FIELDS}
  live_batch['teacher_text'] = batch['text']  # the smoke teacher reads the student's tokenizer
  mesh = sharding_lib.make_mesh(config.mesh)
  common = dict(mesh=mesh, total_steps=4, warmup_steps=1, vocab_size=helpers.SHAPES_VOCAB)
  live = trainer_lib.build_trainer(config, teacher=teacher, **common)
  cached = trainer_lib.build_trainer(cached_config, teacher=None, **common)
  assert cached.teacher is None
  params = live.init_state(jax.random.key(0))['params']
  key = jax.random.key(3)
  live_loss, live_m = jax.jit(live.task.loss_fn)(params, live_batch, key, teacher.params)
  cached_loss, cached_m = jax.jit(cached.task.loss_fn)(params, batch, key, None)
  # The same mask as the live teacher gives this batch (same frames and crop).
  signals = jax.device_get(tool.signals_fn(config, teacher)(
      teacher.params, batch['video'], batch['text']))
  np.testing.assert_array_equal(signals['keep_idx'], batch['keep_idx'])
  np.testing.assert_allclose(float(cached_loss), float(live_loss), rtol=1e-6, atol=1e-6)
  for k in ('mrm', 'vtc', 'vtm', 'mlm', 'mrm_baseline', 'mask/visible_fraction'):
    if k in live_m:
      np.testing.assert_allclose(float(cached_m[k]), float(live_m[k]), rtol=1e-5, atol=1e-6)
  # And a whole cached train step runs with no teacher params.
  state = cached.init_state(jax.random.key(0))
  _, metrics = cached.train_step(state, sharding_lib.global_batch(batch, mesh), key)
  assert np.isfinite(float(metrics['loss']))


def _records(path):
  manifest = cache_lib.open_manifest(str(path))
  reader = cache_lib.Reader(str(path), manifest)
  return [[reader.get(j, v) for v in range(manifest['views'])] for j in range(N)]


def test_killed_pass_resumes_and_processes_split_the_shards(setup):
  _, _, _, _, root = setup
  path = root / 'split'
  stats = _pass(setup, path, views=2, process_index=0, process_count=2, max_shards=1)
  assert stats['shards'] == 1 and stats['missing'] == 3  # "killed" after one shard
  with open(path / (cache_lib.shard_name(2, 4) + '.tmp.1'), 'wb') as f:
    f.write(b'half')  # killed while writing shard 2
  with pytest.raises(Exception, match='incomplete: 3 of 4'):
    cache_lib.open_manifest(str(path))
  first = os.path.getmtime(path / cache_lib.shard_name(0, 4))
  assert _pass(setup, path, views=2, process_index=0, process_count=2)['shards'] == 1  # shard 2
  assert _pass(setup, path, views=2, process_index=1, process_count=2)['shards'] == 2  # 1, 3
  assert os.path.getmtime(path / cache_lib.shard_name(0, 4)) == first  # not rewritten
  assert _pass(setup, path, views=2)['shards'] == 0
  # The same records as one uninterrupted single-process pass.
  _pass(setup, root / 'whole', views=2)
  for a, b in zip(_records(path), _records(root / 'whole')):
    for ra, rb in zip(a, b):
      for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])
  with pytest.raises(Exception, match='another config'):
    _pass(setup, path, views=3)  # the same directory for another K


def test_resumed_loader_reads_the_same_views(setup):
  _, _, source, _, root = setup
  path = root / 'whole'
  if not os.path.exists(path / cache_lib.MANIFEST):
    _pass(setup, path, views=2)
  _, loader = _loader(setup, path)
  it = iter(loader)
  next(it)
  saved = it.get_state()
  after = [next(it) for _ in range(3)]
  again = iter(loader)
  again.set_state(saved)
  for a in after:
    b = next(again)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Each row is one stored view of its example, and the views vary over the epochs.
  records = _records(path)
  position = {int(ex['id']): j for j, ex in enumerate(source)}
  views = set()
  for batch in after:
    for r in range(N):
      j = position[int(batch['index'][r])]
      v = [np.array_equal(batch['keep_idx'][r], rec['keep_idx'])
           and np.array_equal(batch['mrm_target'][r], rec['mrm_target'])
           for rec in records[j]].index(True)
      views.add(v)
  assert views == {0, 1}


def test_training_run_reads_the_cache_and_loads_no_teacher(setup, shared_smoke, tmp_path):
  config, teacher, _, tokenizer, root = setup
  train = pipeline.train_source(config.data, 'captions', announce=False)
  path = root / 'full'
  tool.run_pass(config, teacher, str(path), views=2, source=train, tokenizer=tokenizer,
                shard_size=256, batch_size=64)
  export = os.path.join(shared_smoke.teacher_workdir, 'export')
  had_teacher = os.path.exists(export)
  cached = config_lib.with_overrides(config, **{'teacher.cache': str(path)})
  results = loop.run(cached, str(tmp_path / 'run'))
  assert results['step'] == config.total_steps and 'zeroshot_t2v_R@1' in results
  assert os.path.exists(export) == had_teacher  # no teacher trained (nor loaded) for it
  rows = helpers.metrics_rows(str(tmp_path / 'run'))
  assert all(np.isfinite(r['mrm']) for r in rows if 'mrm' in r)
