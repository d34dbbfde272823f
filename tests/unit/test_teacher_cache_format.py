"""The offline teacher cache without a teacher: views, records, manifest checks, view choice."""
import os

import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax.data import teacher_cache as cache_lib
from clusterstm_jax.errors import UserError

pytestmark = pytest.mark.unit


def _config(**overrides):
  config = config_lib.load_config_file('configs/pretrain.py:smoke')
  return config_lib.with_overrides(config, **overrides)


def _write_cache(path, config, num_shards=2, written=(0, 1), views=1):
  lay = cache_lib.layout(4, 64, 10, 32)
  manifest = dict(fingerprint=teacher_lib.cache_fingerprint(config), views=views,
                  shard_size=4, num_shards=num_shards, num_examples=8, layout=lay)
  os.makedirs(path, exist_ok=True)
  cache_lib.write_json_atomic(os.path.join(path, cache_lib.MANIFEST), manifest)
  rng = np.random.default_rng(0)
  for i in written:
    records = [cache_lib.encode(dict(frames=np.arange(4), crop=[0, 0, 64],
                                     keep_idx=rng.integers(0, 64, (4, 10)),
                                     mrm_target=rng.normal(size=(4, 64)),
                                     text_emb=rng.normal(size=32)), lay)
               for _ in range(4 * views)]
    cache_lib.write_shard(os.path.join(path, cache_lib.shard_name(i, num_shards)), records)
  return manifest


def test_views_are_deterministic_and_patch_aligned():
  args = dict(num_source_frames=20, height=90, width=160, num_frames=4, image_size=64, patch=8)
  a = cache_lib.make_view(0, 5, 1, **args)
  b = cache_lib.make_view(0, 5, 1, **args)
  np.testing.assert_array_equal(a['frames'], b['frames'])
  np.testing.assert_array_equal(a['crop'], b['crop'])
  crops = {tuple(cache_lib.make_view(0, 5, v, **args)['crop']) for v in range(30)}
  frames = {tuple(cache_lib.make_view(0, 5, v, **args)['frames']) for v in range(30)}
  assert len(crops) > 1 and len(frames) > 1  # views differ
  cell = round(90 * 8 / 64)  # source pixels per student patch
  for top, left, side in crops:
    assert top == 0 and side == 90 and left % cell == 0 and left + side <= 160
  square = cache_lib.make_view(0, 5, 1, **dict(args, width=90))
  np.testing.assert_array_equal(square['crop'], [0, 0, 90])


def test_records_round_trip():
  lay = cache_lib.layout(4, 64, 10, 32)
  rec = dict(frames=np.arange(4), crop=[1, 2, 3], keep_idx=np.arange(40).reshape(4, 10),
             mrm_target=np.linspace(0, 1, 256).reshape(4, 64), text_emb=np.ones(32))
  out = cache_lib.decode(cache_lib.encode(rec, lay), lay)
  for k in rec:
    np.testing.assert_array_equal(out[k], np.asarray(rec[k]).astype(out[k].dtype))
  assert out['mrm_target'].dtype == np.float32 and out['keep_idx'].dtype == np.int16


def _one_line_error(fn, match):
  with pytest.raises(UserError, match=match) as e:
    fn()
  assert '\n' not in str(e.value)


def test_bad_cache_dir_is_one_line_error(tmp_path):
  config = _config()
  want = teacher_lib.cache_fingerprint(config)
  _one_line_error(lambda: cache_lib.open_manifest(str(tmp_path / 'nope'), want),
                  'no manifest.json')
  path = str(tmp_path / 'cache')
  _write_cache(path, config)
  assert cache_lib.open_manifest(path, want)['views'] == 1
  frames8 = teacher_lib.cache_fingerprint(_config(**{'data.num_frames': 8}))
  _one_line_error(lambda: cache_lib.open_manifest(path, frames8),
                  'another config .num_frames: cache 4, config 8')
  grid = teacher_lib.cache_fingerprint(_config(**{'data.image_size': 32}))
  _one_line_error(lambda: cache_lib.open_manifest(path, grid), 'image_size: cache 64')
  other = teacher_lib.cache_fingerprint(_config(**{'teacher.workdir': '/elsewhere'}))
  _one_line_error(lambda: cache_lib.open_manifest(path, other), 'teacher: cache')
  # The check every run makes before building anything.
  cached = _config(**{'teacher.cache': path, 'data.num_frames': 8})
  _one_line_error(lambda: loop.check(cached), 'num_frames')
  _one_line_error(lambda: loop.check(_config(**{'teacher.cache': str(tmp_path / 'x')})),
                  'no manifest')


def test_incomplete_cache_is_refused(tmp_path):
  config = _config()
  path = str(tmp_path / 'cache')
  _write_cache(path, config, written=(0,))
  with open(os.path.join(path, cache_lib.shard_name(1, 2) + '.tmp.99'), 'wb') as f:
    f.write(b'half a shard')  # a pass killed while writing shard 1
  _one_line_error(lambda: cache_lib.open_manifest(path, teacher_lib.cache_fingerprint(config)),
                  'incomplete: 1 of 2 shards missing')


def test_config_the_cache_cannot_stand_in_for():
  for overrides, match in [({'mask.strategy': 'random'}, 'strategy'),
                           ({'loss_weights.mrm': 0.0}, 'mrm'),
                           ({'images.every': 2}, 'images.every'),
                           ({'data.captions': 'sample'}, 'captions')]:
    _one_line_error(lambda: cache_lib.check_config(_config(**overrides)), match)
  # The trainer refuses them too (compile reports and benchmarks build it without a run).
  config = _config(**{'teacher.cache': '/x', 'images.every': 2})
  _one_line_error(lambda: trainer_lib.build_trainer(
      config, mesh=sharding_lib.make_mesh(config.mesh), total_steps=2, warmup_steps=1,
      vocab_size=64), 'images.every')


def test_view_per_visit_is_a_function_of_the_record_rng(tmp_path):
  config = _config()
  path = str(tmp_path / 'cache')
  manifest = _write_cache(path, config, views=3)
  reader = cache_lib.Reader(path, manifest)
  seen = []

  def decode(ex, *, rng, view, **kwargs):
    assert rng is None
    return {'frames': np.asarray(view[0])}

  dec = cache_lib.CachedDecode(decode, reader)
  src = cache_lib.CachedExamples([{'id': j} for j in range(8)])

  def visit(j, seed):
    return dec(src[j], rng=np.random.default_rng([j, seed]))

  for j in range(8):
    for seed in range(6):
      a, b = visit(j, seed), visit(j, seed)  # the same record rng: the same view
      for k in cache_lib.FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
      seen.append(next(v for v in range(3) if np.array_equal(
          reader.get(j, v)['keep_idx'], a['keep_idx'])))
  assert set(seen) == {0, 1, 2}  # every view is visited
