"""Tests of the UMT details of the pretraining losses: VTC positives by video index, hard
negatives that skip the same video, MLM masking [SEP], the standardised MRM target and its
per-clip baseline, and the temperature projection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import losses
from tests import helpers
from tests.unit.test_objectives import CLS, EOS, MASK, PAD, VOCAB, _mlm_ids, _np_unit

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)


def _np_vtc(sim, tau, index):
  """UMT's VTC with sim_targets from idx, in numpy."""
  logits = np.asarray(sim, np.float64) / tau
  pos = (index[:, None] == index[None, :]).astype(np.float64)
  lv = -np.sum(helpers.np_log_softmax(logits) * pos / pos.sum(1, keepdims=True), axis=1)
  lt = -np.sum(helpers.np_log_softmax(logits.T) * pos.T / pos.T.sum(1, keepdims=True), axis=1)
  return 0.5 * (lv.mean() + lt.mean())


def test_vtc_positives_by_video_index():
  rng = np.random.default_rng(7)
  sim = rng.uniform(-1, 1, size=(6, 6))
  index = np.array([4, 9, 4, 1, 9, 4])  # video 4 three times, video 9 twice
  got = losses.vtc_loss(jnp.asarray(sim), 0.1, jnp.asarray(index))
  np.testing.assert_allclose(got, _np_vtc(sim, 0.1, index), rtol=1e-5)
  # All distinct: the diagonal InfoNCE (index None) and an arbitrary relabelling agree.
  distinct = np.array([3, 0, 5, 1, 2, 8])
  np.testing.assert_allclose(losses.vtc_loss(jnp.asarray(sim), 0.1),
                             losses.vtc_loss(jnp.asarray(sim), 0.1, jnp.asarray(distinct)),
                             rtol=1e-6)
  # Scoring every pair of the same video alike is a stationary point by index (no push to
  # tell duplicates apart); with the diagonal only, the duplicates are pushed down as negatives.
  same = jnp.asarray((index[:, None] == index[None, :]) * 1.0)
  grad = lambda idx: np.asarray(jax.grad(lambda s: losses.vtc_loss(s, 0.1, idx))(same))
  dup = (index[:, None] == index[None, :]) & ~np.eye(6, dtype=bool)
  assert np.abs(grad(jnp.asarray(index))[dup]).max() < 1e-3
  assert np.all(grad(None)[dup] > 0.01)


def test_hard_negatives_skip_same_video():
  sim = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, size=(5, 5)), jnp.float32) * 10
  index = jnp.asarray([0, 1, 0, 2, 1])
  pos = losses.same_index(index)
  np.testing.assert_array_equal(np.asarray(pos), np.asarray(index)[:, None] == np.asarray(index))
  keys = jax.random.split(KEY, 300)
  neg_t, neg_v = jax.vmap(lambda k: losses.sample_hard_negatives(sim, k, positive_mask=pos))(
      keys)
  idx = np.asarray(index)
  for negs in (np.asarray(neg_t), np.asarray(neg_v)):
    assert not np.any(idx[negs] == idx[None, :])  # never the same video


def test_mixed_negatives_hard_with_the_given_probability():
  # One negative per row far more similar than the rest: a hard draw always takes it.
  b = 8
  sim = np.zeros((b, b), np.float32)
  favourite = (np.arange(b) + 1) % b
  sim[np.arange(b), favourite] = 50.0
  sim = jnp.asarray(sim)
  keys = jax.random.split(KEY, 2000)
  draw = lambda frac: jax.vmap(lambda k: losses.sample_hard_negatives(
      sim, k, hard_fraction=frac))(keys)
  for frac in (0.0, 0.5, 1.0):
    neg_t, _ = (np.asarray(x) for x in draw(frac))
    assert not np.any(neg_t == np.arange(b))  # never the positive
    took = np.mean(neg_t == favourite)
    # hard with probability frac, and an easy draw hits the favourite 1 / (b - 1) of the time
    want = frac + (1 - frac) / (b - 1)
    assert abs(took - want) < 0.03, (frac, took, want)
  # The ends are the plain draws: 1.0 is UMT's (bitwise), 0.0 is uniform.
  np.testing.assert_array_equal(np.asarray(draw(1.0)[0]), np.asarray(
      jax.vmap(lambda k: losses.sample_hard_negatives(sim, k))(keys)[0]))
  with pytest.raises(ValueError, match='hard_fraction'):
    losses.sample_hard_negatives(sim, KEY, hard_fraction=1.5)


def test_mlm_masks_sep_like_umt():
  from clusterstm_jax.tasks import base, pretrain  # lazy: a task module, only for this test
  text = base.TextSpec(VOCAB, pad_id=PAD, cls_id=CLS, eos_id=EOS, mask_id=MASK)
  ids = jnp.asarray(_mlm_ids(128, 16, np.random.default_rng(9)))
  _, _, w = losses.mlm_mask(ids, KEY, mask_id=MASK, vocab_size=VOCAB,
                            special_ids=pretrain.mlm_special_ids(text))
  ids, w = np.asarray(ids), np.asarray(w)
  assert abs(w[ids == EOS].mean() - 0.5) < 0.1  # [SEP] selected as often as a word
  assert not np.any(w[np.isin(ids, (PAD, CLS))])


def test_standardize_and_mrm_baseline_match_numpy():
  rng = np.random.default_rng(10)
  for shape in ((3, 2, 6), (3, 2, 6, 4)):
    r = rng.normal(size=shape) * 0.03 + rng.normal(size=shape[:1] + (1, 1) + shape[3:])
    keep = rng.random((3, 2, 6)) < 0.3
    z = np.asarray(losses.standardize_per_clip(jnp.asarray(r)))
    mu = r.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(z, (r - mu) / np.sqrt(r.var(axis=(1, 2), keepdims=True) + 1e-6),
                               rtol=1e-4, atol=1e-5)
    # The baseline is the MRM loss of the best per-clip constant (the masked mean).
    m = ~keep if r.ndim == 3 else np.broadcast_to(~keep[..., None], r.shape)
    const = np.zeros_like(r)
    for b in range(3):
      for c in range(1 if r.ndim == 3 else r.shape[3]):
        sl = (b, Ellipsis) if r.ndim == 3 else (b, slice(None), slice(None), c)
        const[sl] = r[sl][m[sl]].mean()
    want = float(losses.mrm_loss(jnp.asarray(const), jnp.asarray(r), jnp.asarray(keep)))
    np.testing.assert_allclose(losses.mrm_baseline(jnp.asarray(r), jnp.asarray(keep)), want,
                               rtol=1e-5)
    # Any other per-clip constant does worse.
    worse = float(losses.mrm_loss(jnp.asarray(const + 0.01), jnp.asarray(r), jnp.asarray(keep)))
    assert worse > want
  flat = np.asarray(losses.standardize_per_clip(jnp.ones((2, 2, 3))))
  assert np.all(flat == 0)  # a constant clip: zeros, no NaN
  c = np.asarray(losses.center_per_clip(jnp.asarray(r)))
  np.testing.assert_allclose(c, r - r.mean(axis=(1, 2), keepdims=True), atol=1e-6)


def test_student_relevance_without_unit_tokens_keeps_their_scale():
  rng = np.random.default_rng(11)
  dec, e = rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 4))
  got = losses.student_relevance(jnp.asarray(dec), jnp.asarray(e), unit_tokens=False)
  np.testing.assert_allclose(got, np.einsum('btnd,bd->btn', dec, _np_unit(e)), rtol=1e-5)
  got = losses.student_relevance(jnp.asarray(dec), jnp.asarray(e), unit_tokens=False,
                                 in_batch=True)
  np.testing.assert_allclose(got, np.einsum('btnd,sd->btns', dec, _np_unit(e)), rtol=1e-5)


def test_temperature_projection_keeps_the_parameter_in_range():
  from clusterstm_jax.models import clusterstm  # lazy: a model module, only for this test
  params = {'temp': jnp.float32(0.9), 'other': jnp.ones(3)}
  out = clusterstm.clamp_temperature(params)
  assert float(out['temp']) == np.float32(clusterstm.TEMP_RANGE[1]) and out['other'] is params['other']
  low = clusterstm.clamp_temperature({'params': {'temp': jnp.float32(-1.0)}})
  assert float(low['params']['temp']) == np.float32(clusterstm.TEMP_RANGE[0])
  assert float(clusterstm.clamp_temperature({'temp': jnp.float32(0.07)})['temp']) == (
      np.float32(0.07))
