"""Tests of the masking package: DPC-KNN, temporal density, strategies and statistics.

The reference test re-implements DPC-KNN + temporal density + selection with plain numpy loops
in float64 (independent of the jnp matmul/log-domain forms) and demands identical selections.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clusterstm_jax.masking import density, dpc, stats, strategies

pytestmark = pytest.mark.unit


# Jitted once per static configuration: much faster here than eager op-by-op dispatch.
_mask = jax.jit(strategies.compute_mask, static_argnums=0,
                static_argnames=('shape', 'num_keep', 'dpc_k', 'd_c', 'normalize'))


def _features(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ---------------------------------------------------------------- numpy reference (loops)

def _ref_dpc(x, nc, k):
  """DPC-KNN on one frame x [N, D] (float64): (assign, centers, rho)."""
  n = len(x)
  d2 = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
  rho = np.array([np.exp(-np.mean(np.sort(np.delete(d2[i], i))[:k])) for i in range(n)])
  dist = np.sqrt(d2)
  delta = np.empty(n)
  for i in range(n):
    above = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
    delta[i] = min(dist[i, j] for j in above) if above else dist.max()
  score = rho * delta
  centers = sorted(range(n), key=lambda i: (-score[i], i))[:nc]
  assign = np.empty(n, np.int64)
  for i in range(n):
    if i in centers:
      assign[i] = centers.index(i)
    else:
      assign[i] = min(range(nc), key=lambda c: (d2[i, centers[c]], c))
  return assign, np.array(centers), rho


def _ref_temporal(f, d_c):
  """rho_tem [T, N] of one clip f [T, N, D] (float64)."""
  t, n, _ = f.shape
  u = f / np.linalg.norm(f, axis=-1, keepdims=True)
  out = np.zeros((t, n))
  for a in range(t):
    for i in range(n):
      for b in range(t):
        if b != a:
          for j in range(n):
            out[a, i] += np.exp(-(1.0 - u[a, i] @ u[b, j]) / d_c)
  return out


def _ref_mask(features, nc, k, d_c, normalize):
  """keep_idx [B,T,nc] and clusters [B,T,N] of the 'clusterstm' strategy."""
  f = np.asarray(features, np.float64)
  bsz, t, n, _ = f.shape
  keep = np.zeros((bsz, t, nc), np.int64)
  clusters = np.zeros((bsz, t, n), np.int64)
  for b in range(bsz):
    rho_tem = _ref_temporal(f[b], d_c) if t > 1 else None
    for a in range(t):
      x = f[b, a]
      if normalize:
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
      assign, _, rho = _ref_dpc(x, nc, k)
      score = rho_tem[a] if t > 1 else rho
      picks = []
      for c in range(nc):
        members = [i for i in range(n) if assign[i] == c]
        picks.append(max(members, key=lambda i: (score[i], -i)))
      keep[b, a] = sorted(picks)
      clusters[b, a] = assign
  return keep, clusters


# ---------------------------------------------------------------- reference agreement

@pytest.mark.parametrize('shape,nc,k,normalize', [
    ((2, 3, 16, 8), 4, 5, True),
    ((1, 4, 20, 6), 3, 3, False),
    ((2, 2, 12, 5), 5, 4, True),
    ((2, 1, 14, 7), 4, 5, False),   # an image: local density picks
    ((1, 5, 10, 4), 2, 2, True),    # odd T: the symmetric split has unequal halves
])
def test_clusterstm_matches_numpy_reference(shape, nc, k, normalize):
  feats = _features(sum(shape) + nc, shape)
  out = _mask('clusterstm', None, shape=shape[:3], num_keep=nc, features=feats,
                                dpc_k=k, d_c=0.3, normalize=normalize)
  ref_keep, ref_clusters = _ref_mask(feats, nc, k, 0.3, normalize)
  np.testing.assert_array_equal(out.keep_idx, ref_keep)
  np.testing.assert_array_equal(out.clusters, ref_clusters)


def test_dpc_and_density_values_match_numpy():
  feats = _features(3, (2, 3, 12, 6))
  res = jax.jit(lambda f: dpc.dpc_knn(f, 4, k=3))(feats)
  temporal = jax.jit(lambda f: density.temporal_density(f, 0.2))
  rho_tem = temporal(feats)
  f64 = np.asarray(feats, np.float64)
  for b in range(2):
    for t in range(3):
      assign, centers, rho = _ref_dpc(f64[b, t], 4, 3)
      np.testing.assert_allclose(res.rho[b, t], rho, rtol=1e-4)
      np.testing.assert_array_equal(res.centers[b, t], centers)
      np.testing.assert_array_equal(res.cluster_assign[b, t], assign)
    np.testing.assert_allclose(rho_tem[b], _ref_temporal(f64[b], 0.2), rtol=1e-4)
  np.testing.assert_array_equal(temporal(feats[:, :1]), 0.0)


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize('strategy', strategies.STRATEGIES)
def test_exactly_nc_unique_sorted_in_range(strategy):
  b, t, n, nc = 2, 3, 20, 6
  out = _mask(strategy, jax.random.key(1), shape=(b, t, n), num_keep=nc,
                                features=_features(0, (b, t, n, 8)))
  keep = np.asarray(out.keep_idx)
  assert keep.shape == (b, t, nc) and keep.dtype == np.int32
  assert out.keep_mask.shape == (b, t, n) and out.keep_mask.dtype == bool
  assert np.all(np.diff(keep, axis=-1) > 0)  # strictly ascending => unique
  assert keep.min() >= 0 and keep.max() < n
  np.testing.assert_array_equal(np.asarray(out.keep_mask).sum(-1), nc)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(out.keep_mask), keep, -1), True)
  clusters = np.asarray(out.clusters)
  if strategy in strategies.CLUSTER_STRATEGIES:
    # One kept token per cluster: the kept tokens' cluster ids are a permutation of range(nc).
    kept_ids = np.sort(np.take_along_axis(clusters, keep, -1), -1)
    np.testing.assert_array_equal(kept_ids, np.broadcast_to(np.arange(nc), (b, t, nc)))
  else:
    np.testing.assert_array_equal(clusters, -1)


@pytest.mark.parametrize('strategy', strategies.STRATEGIES)
def test_deterministic_given_inputs_and_rng(strategy):
  shape, feats = (2, 2, 16), _features(5, (2, 2, 16, 6))
  run = lambda key: _mask(strategy, key, shape=shape, num_keep=4,
                                            features=feats).keep_idx
  np.testing.assert_array_equal(run(jax.random.key(7)), run(jax.random.key(7)))
  if strategy != 'clusterstm':  # rng-driven: another key moves the selection
    assert not np.array_equal(run(jax.random.key(7)), run(jax.random.key(8)))
  else:
    np.testing.assert_array_equal(run(jax.random.key(7)), run(None))


def test_tube_same_spatial_set_in_every_frame_random_differs():
  shape = (3, 4, 25)
  tube = _mask('tube', jax.random.key(0), shape=shape, num_keep=5)
  np.testing.assert_array_equal(tube.keep_idx, np.broadcast_to(tube.keep_idx[:, :1], (3, 4, 5)))
  assert not np.array_equal(tube.keep_idx[0], tube.keep_idx[1])  # per clip, not global
  rand = _mask('random', jax.random.key(0), shape=shape, num_keep=5)
  assert not np.array_equal(rand.keep_idx[:, 0], rand.keep_idx[:, 1])  # independent per frame


def test_random_is_roughly_uniform():
  out = _mask('random', jax.random.key(3), shape=(200, 4, 10), num_keep=3)
  freq = np.asarray(out.keep_mask).mean(axis=(0, 1))
  np.testing.assert_allclose(freq, 0.3, atol=0.05)


@pytest.mark.parametrize('strategy', ['random', 'tube', 'clusterstm_random_pick'])
def test_other_strategies_keep_nc_at_t1(strategy):
  # Images (T = 1): ClusterSTM's own image rule is checked in a run (integration/test_images.py).
  n, nc = 64, 10
  feats = jax.random.normal(jax.random.key(0), (4, 1, n, 8))
  out = strategies.compute_mask(strategy, jax.random.key(2), shape=(4, 1, n), num_keep=nc,
                                features=feats)
  keep = np.asarray(out.keep_idx)
  assert keep.shape == (4, 1, nc)
  assert all(len(set(r)) == nc and min(r) >= 0 and max(r) < n
             for r in keep.reshape(4, nc).tolist())


# ---------------------------------------------------------------- hand-built case

def _grouped_clip(rng, t, n, groups, d):
  """Frames of `groups` well-separated feature groups; in every group and frame one token (at a
  frame-dependent position) carries the same feature in all frames, the rest fresh noise of the
  same size (so only the recurrence singles it out)."""
  centres = np.eye(d)[:groups] * 5.0
  recurring = centres + 0.3 * rng.normal(size=(groups, d))
  feats = np.zeros((t, n, d), np.float32)
  group_of = np.zeros((t, n), np.int64)
  recurring_pos = np.zeros((t, groups), np.int64)
  for a in range(t):
    perm = rng.permutation(n)
    for g in range(groups):
      toks = perm[g::groups]
      group_of[a, toks] = g
      feats[a, toks] = centres[g] + 0.3 * rng.normal(size=(len(toks), d))
      recurring_pos[a, g] = toks[0]
      feats[a, toks[0]] = recurring[g]
  return feats, group_of, recurring_pos


@pytest.mark.parametrize('normalize', [True, False])
def test_hand_built_groups_keep_the_recurring_token(normalize):
  rng = np.random.default_rng(0)
  b, t, n, groups, d = 2, 3, 32, 4, 12
  clips = [_grouped_clip(rng, t, n, groups, d) for _ in range(b)]
  feats = jnp.asarray(np.stack([c[0] for c in clips]))
  # A small d_c: only near-copies count (cosine distance between two noisy tokens ~0.04).
  out = _mask('clusterstm', None, shape=(b, t, n), num_keep=groups,
                                features=feats, d_c=0.005, normalize=normalize)
  for i, (_, group_of, recurring_pos) in enumerate(clips):
    for a in range(t):
      clusters = np.asarray(out.clusters[i, a])
      # The clusters are exactly the groups (up to relabelling).
      for g in range(groups):
        assert len(set(clusters[group_of[a] == g])) == 1
      assert len(set(clusters)) == groups
      np.testing.assert_array_equal(out.keep_idx[i, a], np.sort(recurring_pos[a]))


def test_duplicate_features_one_peak_and_valid_mask():
  feats = jnp.ones((1, 2, 10, 4)).at[0, 1, 5:].set(2.0)  # frame 0 all equal; frame 1 two values
  res = jax.jit(lambda f: dpc.dpc_knn(f, 3, k=2))(feats)
  assert np.isfinite(np.asarray(res.log_rho)).all()
  for a in range(2):
    assert len(set(np.asarray(res.centers[0, a]).tolist())) == 3
  assert int(res.centers[0, 0, 0]) == 0  # equal densities: the lowest index is the peak
  out = _mask('clusterstm', None, shape=(1, 2, 10), num_keep=3, features=feats)
  np.testing.assert_array_equal(np.asarray(out.keep_mask).sum(-1), 3)
  assert np.all(np.diff(np.asarray(out.keep_idx), axis=-1) > 0)


# ---------------------------------------------------------------- jit, vmap, sharding

def test_jit_traces_once():
  chex.clear_trace_counter()
  shape, cfg = (2, 2, 16), strategies.default_mask_config()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def mask_fn(feats, key):
    return strategies.mask_from_config(cfg, key, shape, feats)

  for seed in range(3):
    out = mask_fn(_features(seed, (2, 2, 16, 8)), jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out.keep_mask).sum(-1), 2)


@pytest.mark.parametrize('strategy', ['clusterstm', 'clusterstm_random_pick', 'random'])
def test_vmap_matches_per_slice(strategy):
  shape = (2, 2, 12)
  feats = _features(1, (3,) + shape + (5,))
  keys = jax.random.split(jax.random.key(0), 3)
  fn = lambda f, r: strategies.compute_mask(strategy, r, shape=shape, num_keep=4, features=f)
  batched = jax.jit(jax.vmap(fn))(feats, keys)
  for v in range(3):
    single = jax.jit(fn)(feats[v], keys[v])
    np.testing.assert_array_equal(batched.keep_idx[v], single.keep_idx)
    np.testing.assert_array_equal(batched.clusters[v], single.clusters)


@pytest.mark.parametrize('strategy', strategies.STRATEGIES)
def test_sharded_batch_matches_unsharded(strategy):
  devices = jax.devices()
  assert len(devices) == 8, 'conftest should give 8 CPU devices'
  shape = (8, 2, 16)
  feats, key = _features(2, shape + (8,)), jax.random.key(4)
  fn = jax.jit(lambda f, r: strategies.compute_mask(strategy, r, shape=shape, num_keep=5,
                                                      features=f))
  expected = fn(jax.device_put(feats, devices[0]), jax.device_put(key, devices[0]))
  mesh = Mesh(np.array(devices), ('data',))
  sharded = fn(jax.device_put(feats, NamedSharding(mesh, P('data'))),
               jax.device_put(key, NamedSharding(mesh, P())))
  assert len(sharded.keep_idx.sharding.device_set) == 8
  for got, want in zip(sharded, expected):
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- interface and errors

def test_num_keep():
  assert strategies.num_keep(196, 0.85) == 29
  assert strategies.num_keep(64, 0.85) == 10
  assert strategies.num_keep(10, 0.25) == 8   # 7.5 rounds up
  assert strategies.num_keep(10, 0.99) == 1   # clamped to keep one token
  assert strategies.num_keep(7, 0.0) == 7
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='ratio'):
      strategies.num_keep(10, bad)


def test_mask_from_config_equals_compute_mask():
  cfg = strategies.default_mask_config()
  assert (cfg.strategy, cfg.ratio, cfg.dpc_k) == ('clusterstm', 0.85, 5)
  cfg.ratio, cfg.d_c = 0.75, 0.2
  feats = _features(9, (1, 2, 16, 8))
  got = jax.jit(lambda f: strategies.mask_from_config(cfg, None, (1, 2, 16), f))(feats)
  want = _mask('clusterstm', None, shape=(1, 2, 16), num_keep=4,
                                 features=feats, dpc_k=5, d_c=0.2, normalize=cfg.normalize)
  np.testing.assert_array_equal(got.keep_idx, want.keep_idx)


def test_bad_inputs_raise_clear_errors():
  feats = _features(0, (1, 2, 8, 4))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="'blocks'"):
    strategies.compute_mask('blocks', key, shape=(1, 2, 8), num_keep=2)
  with pytest.raises(ValueError, match="'clusterstm_random_pick' needs teacher features"):
    strategies.compute_mask('clusterstm_random_pick', key, shape=(1, 2, 8), num_keep=2)
  with pytest.raises(ValueError, match="'random' needs an rng"):
    strategies.compute_mask('random', None, shape=(1, 2, 8), num_keep=2)
  with pytest.raises(ValueError, match='num_keep'):
    strategies.compute_mask('random', key, shape=(1, 2, 8), num_keep=9)
  with pytest.raises(ValueError, match='features must be'):
    strategies.compute_mask('clusterstm', key, shape=(1, 2, 9), num_keep=2, features=feats)
  with pytest.raises(ValueError, match='dpc k'):
    strategies.compute_mask('clusterstm', key, shape=(1, 2, 8), num_keep=2, features=feats,
                            dpc_k=8)
  with pytest.raises(ValueError, match='d_c'):
    strategies.compute_mask('clusterstm', key, shape=(1, 2, 8), num_keep=2, features=feats,
                            d_c=0.0)


def test_no_gradient_through_features():
  feats = _features(0, (1, 2, 8, 4))
  fn = lambda f: jnp.sum(strategies.compute_mask(
      'clusterstm', None, shape=(1, 2, 8), num_keep=2, features=f).keep_mask * f[..., 0])
  grad = jax.jit(jax.grad(fn))(feats)  # only the explicit product contributes
  np.testing.assert_array_equal(grad[..., 1:], 0.0)


# ---------------------------------------------------------------- statistics

def _label_clip():
  """1 clip, 2 frames of 8x8 pixels, patch 4 -> 2x2 tokens (row-major: 0 1 / 2 3)."""
  labels = np.zeros((1, 2, 8, 8), np.uint8)
  labels[0, 0, 0, 0] = 1          # frame 0: object 0 on one pixel of token 0
  labels[0, 0, 2:6, 5:7] = 2      # frame 0: object 1 straddles tokens 1 and 3
  labels[0, 1, 5:8, 1:3] = 1      # frame 1: object 0 inside token 2; object 1 absent
  labels[0, 1, 0, 7] = 7          # label beyond max_objects: ignored
  return jnp.asarray(labels)


def test_token_objects_hand_made():
  obj = np.asarray(stats.token_objects(_label_clip(), patch=4, max_objects=3))
  assert obj.shape == (1, 2, 4, 3) and obj.dtype == bool
  want = np.zeros((1, 2, 4, 3), bool)
  want[0, 0, 0, 0] = want[0, 0, 1, 1] = want[0, 0, 3, 1] = True
  want[0, 1, 2, 0] = True
  np.testing.assert_array_equal(obj, want)
  # A fraction threshold drops the single-pixel cover (1/16 < 1/4); 4 of 16 pixels stay.
  obj_frac = np.asarray(stats.token_objects(_label_clip(), 4, 3, min_fraction=0.25))
  want[0, 0, 0, 0] = False
  np.testing.assert_array_equal(obj_frac, want)
  with pytest.raises(ValueError, match='patch'):
    stats.token_objects(_label_clip(), patch=3)


def test_mask_stats_hand_made():
  obj = stats.token_objects(_label_clip(), patch=4)
  keep = jnp.asarray([[[True, False, True, False], [False, False, True, True]]])
  got = jax.jit(stats.mask_stats)(keep, obj)
  # Present (object, frame) pairs: (0,f0) (1,f0) (0,f1); covered: (0,f0) via token 0, (0,f1).
  np.testing.assert_allclose(got['object_coverage'], 2 / 3, rtol=1e-6)
  # Kept tokens: f0 {0, 2}, f1 {2, 3}; on an object: f0 token 0, f1 token 2.
  np.testing.assert_allclose(got['kept_on_objects'], 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(got['object_area'], 4 / 8, rtol=1e-6)  # f0: 0, 1, 3; f1: 2
  # Of the kept positions of frame 0 ({0, 2}), token 2 is kept again in frame 1.
  np.testing.assert_allclose(got['temporal_recurrence'], 1 / 2, rtol=1e-6)
  assert all(isinstance(v, jax.Array) and v.shape == () for v in got.values())


def test_mask_stats_extremes():
  obj = jnp.zeros((2, 3, 4, 3), bool)
  keep = jnp.ones((2, 3, 4), bool)
  got = stats.mask_stats(keep, obj)
  assert float(got['object_coverage']) == 1.0 and float(got['kept_on_objects']) == 0.0
  assert float(got['temporal_recurrence']) == 1.0
  tube = _mask('tube', jax.random.key(0), shape=(2, 3, 16), num_keep=4)
  obj = jnp.ones((2, 3, 16, 1), bool)
  got = stats.mask_stats(tube.keep_mask, obj)
  assert float(got['temporal_recurrence']) == 1.0 and float(got['object_coverage']) == 1.0
