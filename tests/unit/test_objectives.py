"""Tests of the MRM / VTM / MLM losses (clusterstm_jax.losses) against direct numpy
computations, and of the MAE-style video decoder (models/decoder.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import losses
from clusterstm_jax.models import common, decoder
from tests import helpers

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)


def _np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- relevance / MRM
def test_relevance_paired_and_in_batch_match_numpy():
  rng = np.random.default_rng(0)
  b, t, n, d = 3, 2, 4, 5
  v, e = rng.normal(size=(b, t, n, d)), rng.normal(size=(b, d)) * 7.0
  paired = np.zeros((b, t, n))
  in_batch = np.zeros((b, t, n, b))
  for i in range(b):
    for f in range(t):
      for p in range(n):
        vn = v[i, f, p] / np.sqrt(np.sum(v[i, f, p] ** 2))
        paired[i, f, p] = vn @ (e[i] / np.sqrt(np.sum(e[i] ** 2)))
        for s in range(b):
          in_batch[i, f, p, s] = vn @ (e[s] / np.sqrt(np.sum(e[s] ** 2)))
  vj, ej = jnp.asarray(v, jnp.float32), jnp.asarray(e, jnp.float32)
  for fn in (losses.relevance_target, losses.student_relevance):
    np.testing.assert_allclose(fn(vj, ej), paired, atol=1e-5)
    np.testing.assert_allclose(fn(vj, ej, in_batch=True), in_batch, atol=1e-5)
  # In-batch with a different number of captions than clips.
  e5 = rng.normal(size=(5, d))
  got = losses.relevance_target(vj, jnp.asarray(e5, jnp.float32), in_batch=True)
  np.testing.assert_allclose(got, np.einsum("btnd,sd->btns", _np_unit(v), _np_unit(e5)),
                             atol=1e-5)
  with pytest.raises(ValueError, match="one caption per clip"):
    losses.relevance_target(vj, jnp.asarray(e5, jnp.float32))
  with pytest.raises(ValueError):
    losses.student_relevance(vj, jnp.ones((b, d + 1)))


def test_relevance_target_stops_gradient_student_does_not():
  v, e = jnp.ones((1, 1, 2, 4)), jnp.arange(1.0, 5.0)[None]
  g_t = jax.grad(lambda x: losses.relevance_target(x, e).sum())(v)
  g_s = jax.grad(lambda x: losses.student_relevance(x, e).sum())(v)
  assert np.all(np.asarray(g_t) == 0) and np.any(np.asarray(g_s) != 0)


def _np_mrm(s, r, keep):
  masked = ~keep
  if s.ndim == 4:
    diffs = (s - r)[masked]  # [M, C]
  else:
    diffs = (s - r)[masked][:, None]
  return 0.0 if diffs.size == 0 else float(np.mean(diffs ** 2))


@pytest.mark.parametrize("captions", [None, 3])
def test_mrm_loss_matches_numpy_and_ignores_kept_places(captions):
  rng = np.random.default_rng(1)
  shape = (2, 3, 6) + ((captions,) if captions else ())
  s, r = rng.normal(size=shape), rng.normal(size=shape)
  keep = rng.random(size=(2, 3, 6)) < 0.4
  got = losses.mrm_loss(jnp.asarray(s), jnp.asarray(r), jnp.asarray(keep))
  np.testing.assert_allclose(got, _np_mrm(s, r, keep), rtol=1e-5)
  # Anything (even NaN) at a kept place leaves the loss unchanged; a masked place changes it.
  s2 = s.copy()
  s2[keep] = np.nan
  np.testing.assert_allclose(losses.mrm_loss(jnp.asarray(s2), jnp.asarray(r),
                                             jnp.asarray(keep)), got, rtol=1e-6)
  s3 = s.copy()
  s3[~keep] += 1.0
  assert abs(float(losses.mrm_loss(jnp.asarray(s3), jnp.asarray(r), jnp.asarray(keep)))
             - float(got)) > 1e-3


def test_mrm_loss_all_kept_is_zero_and_shape_errors():
  s = jnp.ones((1, 2, 3))
  assert float(losses.mrm_loss(s, s * 5, jnp.ones((1, 2, 3), bool))) == 0.0
  with pytest.raises(ValueError):
    losses.mrm_loss(s, jnp.ones((1, 2, 4)), jnp.ones((1, 2, 3), bool))
  with pytest.raises(ValueError):
    losses.mrm_loss(s, s, jnp.ones((1, 2, 4), bool))


# ----------------------------------------------------------------------------- VTM
def test_hard_negatives_never_positive_and_follow_softmax():
  b, tau, draws = 4, 0.5, 4000
  sim = jnp.asarray([[0.9, 0.1, 0.5, -0.3],
                     [0.2, 0.8, 0.7, 0.0],
                     [-0.5, 0.4, 0.6, 0.3],
                     [0.1, 0.1, 0.1, 0.9]], jnp.float32)
  keys = jax.random.split(jax.random.key(3), draws)
  neg_t, neg_v = jax.jit(jax.vmap(
      lambda k: losses.sample_hard_negatives(sim, k, temperature=tau)))(keys)
  neg_t, neg_v = np.asarray(neg_t), np.asarray(neg_v)
  assert neg_t.shape == neg_v.shape == (draws, b) and neg_t.dtype == np.int32
  assert not np.any(neg_t == np.arange(b)) and not np.any(neg_v == np.arange(b))

  def expected(scores):  # softmax over the row without the positive (numpy, independent)
    p = np.exp(np.asarray(scores, np.float64) / tau)
    np.fill_diagonal(p, 0.0)
    return p / p.sum(1, keepdims=True)

  sim_np = np.asarray(sim)
  for draws_of, probs in ((neg_t, expected(sim_np)), (neg_v, expected(sim_np.T))):
    for i in range(b):
      counts = np.bincount(draws_of[:, i], minlength=b)
      exp_counts = probs[i] * draws
      off = np.arange(b) != i
      chi2 = np.sum((counts[off] - exp_counts[off]) ** 2 / exp_counts[off])
      assert chi2 < 16.3, (i, counts, exp_counts)  # chi-square, 2 dof, p = 3e-4
  # Same key -> same draw; another key -> (almost surely) another set of draws.
  a = losses.sample_hard_negatives(sim, keys[0], temperature=tau)
  c = losses.sample_hard_negatives(sim, keys[0], temperature=tau)
  assert all(np.array_equal(x, y) for x, y in zip(a, c))


def test_hard_negatives_positive_mask_and_errors():
  sim = jnp.zeros((3, 3))
  pos = jnp.asarray([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)  # clips 0, 1 share a video
  keys = jax.random.split(KEY, 200)
  neg_t, neg_v = jax.vmap(lambda k: losses.sample_hard_negatives(sim, k, positive_mask=pos))(
      keys)
  assert np.all(np.asarray(neg_t)[:, :2] == 2) and np.all(np.asarray(neg_v)[:, :2] == 2)
  assert set(np.asarray(neg_t)[:, 2].tolist()) == {0, 1}
  with pytest.raises(ValueError, match="at least 2"):
    losses.sample_hard_negatives(jnp.zeros((1, 1)), KEY)
  with pytest.raises(ValueError):
    losses.sample_hard_negatives(jnp.zeros((2, 3)), KEY)


def test_vtm_loss_matches_numpy():
  rng = np.random.default_rng(2)
  b = 3
  logits = rng.normal(size=(3 * b, 2)) * 2
  labels = np.array([1] * b + [0] * (2 * b))
  want = -np.mean(helpers.np_log_softmax(logits)[np.arange(3 * b), labels])
  np.testing.assert_allclose(losses.vtm_loss(jnp.asarray(logits)), want, rtol=1e-5)
  np.testing.assert_array_equal(losses.vtm_labels(b), labels)
  for bad in ((4, 2), (6, 3), (0, 2)):
    with pytest.raises(ValueError):
      losses.vtm_loss(jnp.zeros(bad))


# ----------------------------------------------------------------------------- MLM
PAD, CLS, EOS, MASK, VOCAB = 0, 2, 3, 4, 50


def _mlm_ids(b, length, rng):
  ids = rng.integers(5, VOCAB, size=(b, length))
  ids[:, 0] = CLS
  lengths = rng.integers(3, length, size=b)
  for i, n in enumerate(lengths):
    ids[i, n] = EOS
    ids[i, n + 1:] = PAD
  return ids


def test_mlm_mask_statistics_specials_and_determinism():
  ids = _mlm_ids(256, 24, np.random.default_rng(4))
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD, CLS, EOS))
  mask_fn = jax.jit(lambda x, k: losses.mlm_mask(x, k, **kw))
  masked, targets, weights = mask_fn(jnp.asarray(ids), jax.random.key(5))
  masked, targets, weights = map(np.asarray, (masked, targets, weights))
  assert masked.shape == targets.shape == weights.shape == ids.shape
  assert masked.dtype == np.int32 and weights.dtype == np.float32
  special = np.isin(ids, (PAD, CLS, EOS))
  sel = weights > 0
  assert set(np.unique(weights).tolist()) <= {0.0, 1.0}
  assert not np.any(sel & special) and np.array_equal(masked[special], ids[special])
  np.testing.assert_array_equal(targets[sel], ids[sel])
  np.testing.assert_array_equal(masked[~sel], ids[~sel])  # unselected tokens never change
  n_ordinary = np.sum(~special)
  frac = sel.sum() / n_ordinary
  assert abs(frac - 0.5) < 0.03, frac
  to_mask = sel & (masked == MASK)
  changed = sel & (masked != MASK) & (masked != ids)
  f_mask, f_rand = to_mask.sum() / sel.sum(), changed.sum() / sel.sum()
  # Random draws equal to the original token (1/45) show up as "kept".
  assert abs(f_mask - 0.8) < 0.03 and abs(f_rand - 0.1 * 44 / 45) < 0.02, (f_mask, f_rand)
  # Random replacements are ordinary tokens: never pad / [CLS] / [SEP] / [MASK].
  assert not np.any(np.isin(masked[changed], (PAD, CLS, EOS, MASK)))
  again = mask_fn(jnp.asarray(ids), jax.random.key(5))
  np.testing.assert_array_equal(again[0], masked)
  other = mask_fn(jnp.asarray(ids), jax.random.key(6))
  assert not np.array_equal(np.asarray(other[2]), weights)


def test_mlm_mask_random_tokens_uniform_over_the_ordinary_vocab():
  ids = jnp.full((64, 64), 7, jnp.int32)
  masked, _, w = losses.mlm_mask(ids, KEY, mask_id=1, vocab_size=12, special_ids=(0, 5, 9),
                                 select_prob=1.0, mask_prob=0.0, random_prob=1.0)
  assert np.all(np.asarray(w) == 1)
  values, counts = np.unique(np.asarray(masked), return_counts=True)
  assert values.tolist() == [2, 3, 4, 6, 7, 8, 10, 11]
  expected = ids.size / len(values)
  assert np.sum((counts - expected) ** 2 / expected) < 24.3  # chi-square, 7 dof, p = 1e-3


def test_mlm_mask_errors():
  ids = jnp.ones((2, 4), jnp.int32)
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD,))
  with pytest.raises(ValueError):
    losses.mlm_mask(ids, KEY, **{**kw, "mask_prob": 0.95, "random_prob": 0.1})
  with pytest.raises(ValueError):
    losses.mlm_mask(ids, KEY, **{**kw, "mask_id": VOCAB})
  with pytest.raises(ValueError):
    losses.mlm_mask(ids.astype(jnp.float32), KEY, **kw)
  with pytest.raises(ValueError):
    losses.mlm_mask(ids, KEY, **{**kw, "select_prob": 1.5})


def test_mlm_loss_matches_numpy_and_empty_is_zero():
  rng = np.random.default_rng(7)
  b, length, v = 2, 5, 11
  logits = rng.normal(size=(b, length, v)) * 3
  targets = rng.integers(0, v, size=(b, length))
  weights = (rng.random(size=(b, length)) < 0.5).astype(np.float32)
  weights[0, 0] = 1.0
  logp = helpers.np_log_softmax(logits)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  want = (nll * weights).sum() / weights.sum()
  got = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  zero = np.zeros_like(weights)
  loss, grad = jax.value_and_grad(losses.mlm_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                                   jnp.asarray(zero))
  assert float(loss) == 0.0 and np.all(np.isfinite(np.asarray(grad)))
  with pytest.raises(ValueError):
    losses.mlm_loss(jnp.asarray(logits), jnp.asarray(targets[:, :4]), jnp.asarray(weights))


# ----------------------------------------------------------------------------- decoder
def _keep_idx(b, t, n, nc, seed):
  rng = np.random.default_rng(seed)
  return np.stack([np.stack([np.sort(rng.permutation(n)[:nc]) for _ in range(t)])
                   for _ in range(b)]).astype(np.int32)


def test_scatter_tokens_places_visible_tokens():
  b, t, n, nc, w = 2, 3, 6, 2, 4
  keep = _keep_idx(b, t, n, nc, 0)
  vis = np.random.default_rng(1).normal(size=(b, t, nc, w)).astype(np.float32)
  grid, kept = decoder.scatter_tokens(jnp.asarray(vis), jnp.asarray(keep), n)
  want = np.zeros((b, t, n, w), np.float32)
  want_kept = np.zeros((b, t, n), bool)
  for i in range(b):
    for f in range(t):
      for j in range(nc):
        want[i, f, keep[i, f, j]] = vis[i, f, j]
        want_kept[i, f, keep[i, f, j]] = True
  np.testing.assert_array_equal(grid, want)
  np.testing.assert_array_equal(kept, want_kept)


def test_decoder_depth0_puts_tokens_at_keep_idx():
  """depth 0: decoded = head(LN(embed(x) or mask_token, + pos)); rebuilt in numpy."""
  b, t, h, w, nc, d_enc, width, out = 2, 2, 2, 3, 2, 8, 16, 5
  n = h * w
  keep = _keep_idx(b, t, n, nc, 2)
  vis = np.random.default_rng(3).normal(size=(b, t, nc, d_enc)).astype(np.float32)
  model = decoder.VideoDecoder(width, 0, 2, 32, out)
  params = nn.unbox(jax.jit(lambda k: model.init(k, vis, keep, (t, h, w)))(KEY))
  got = np.asarray(jax.jit(lambda p: model.apply(p, vis, keep, (t, h, w)))(params))
  assert got.shape == (b, t, n, out)
  p = params["params"]
  x = np.broadcast_to(np.asarray(p["mask_token"]).reshape(width), (b, t, n, width)).copy()
  emb = vis @ np.asarray(p["decoder_embed"]["kernel"]) + np.asarray(p["decoder_embed"]["bias"])
  for i in range(b):
    for f in range(t):
      x[i, f, keep[i, f]] = emb[i, f]
  x = x + common.sincos_posemb_3d(t, h, w, width)[None]
  ln = p["Transformer"]["encoder_norm"]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  want = y @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_decoder_bad_inputs():
  model = decoder.VideoDecoder(16, 1, 2, 32, 4)
  vis, keep = jnp.ones((1, 2, 2, 8)), jnp.zeros((1, 2, 2), jnp.int32)
  for args, match in [((vis, keep, (3, 2, 2)), "T=3"),
                      ((vis, keep[:, :1], (2, 2, 2)), "keep_idx"),
                      ((vis, keep.astype(jnp.float32), (2, 2, 2)), "integer"),
                      ((vis, keep, (2, 1, 1)), "places"),
                      ((vis, keep, (2, 2)), "grid")]:
    with pytest.raises(ValueError, match=match):
      model.init(KEY, *args)
  with pytest.raises(ValueError, match="multiple of 16"):
    decoder.VideoDecoder(24, 1, 2, 32, 4).init(KEY, vis, keep, (2, 2, 2))


def test_decoder_sharded_matches_plain_and_masked_places_see_visible_tokens():
  """Born sharded under a mesh (attention kernels included) = plain; then, on the plain
  params: the output at masked places depends on visible tokens of other frames of the same
  clip, never on other clips; T = 1 (images) runs on the same params."""
  rules, mesh = helpers.MODEL_RULES, helpers.model_mesh()
  b, t, h, w, nc, d_enc, out = 4, 2, 2, 2, 2, 8, 4
  n, grid = h * w, (t, h, w)
  model = decoder.VideoDecoder(width=16, depth=1, num_heads=2, mlp_dim=32, out_dim=out)
  vis = jax.random.normal(KEY, (b, t, nc, d_enc))
  keep = jnp.asarray(_keep_idx(b, t, n, nc, 5))
  abstract = jax.eval_shape(lambda k: model.init(k, vis, keep, grid), KEY)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params = jax.jit(lambda k: model.init(k, vis, keep, grid), out_shardings=shardings)(KEY)
    sharded = jax.jit(lambda p, v, i: model.apply(p, v, i, grid))(params, vis, keep)
  assert tuple(params["params"]["mask_token"].value.sharding.spec) == (None, None, None, "fsdp")
  assert tuple(params["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
               ["query"]["kernel"].value.sharding.spec) == ("fsdp", "tensor", None)
  plain_params = jax.device_get(nn.unbox(params))
  assert set(helpers.flat(plain_params["params"])) >= {
      "mask_token", "decoder_embed/kernel", "head/kernel", "Transformer/encoder_norm/scale",
      "Transformer/encoderblock_0/LayerNorm_0/scale"}
  apply = jax.jit(lambda p, v, i: model.apply(p, v, i, grid))
  plain = np.asarray(apply(plain_params, vis, keep))
  assert plain.shape == (b, t, n, out)
  np.testing.assert_allclose(sharded, plain, atol=1e-5)

  moved = np.asarray(apply(plain_params, vis.at[0, 1, 0].add(1.0), keep))  # clip 0, frame 1
  masked = ~np.isin(np.arange(n), np.asarray(keep[0, 0]))  # masked places of clip 0, frame 0
  assert np.max(np.abs(moved[0, 0][masked] - plain[0, 0][masked])) > 1e-4
  np.testing.assert_allclose(moved[1:], plain[1:], atol=1e-6)  # other clips: unchanged
  img = jax.jit(lambda p, v, i: model.apply(p, v, i, (1, h, w)))(plain_params, vis[:, :1],
                                                                  keep[:, :1])
  assert img.shape == (b, 1, n, out) and np.all(np.isfinite(np.asarray(img)))


def test_l2_normalize_is_unit_norm_in_float32_and_keeps_zero_vectors():
  x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32) * 4.0
  x[1, 2] = 0.0
  got = losses.l2_normalize(jnp.asarray(x))
  want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(got)[1, 2])
  half = losses.l2_normalize(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.float32  # normalised in float32 whatever the input
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(jnp.asarray(x), axis=0)),
                             x / np.linalg.norm(x, axis=0, keepdims=True), rtol=1e-5)


# ----------------------------------------------------------------------------- UMT details
