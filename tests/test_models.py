"""Tests of the model modules (common, vit, text, siglip) at tiny 'Pico' sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clusterstm_jax.models import common, siglip, text, vit

KEY = jax.random.key(0)


def _flat(tree):
  return {"/".join(str(getattr(p, "key", p)) for p in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _np_gelu(x):  # flax's nn.gelu default is the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


# ----------------------------------------------------------------------------- common
def test_parse_variant_and_overrides():
  dims, patch = common.parse_variant("B/16")
  assert dims == dict(width=768, depth=12, mlp_dim=3072, num_heads=12) and patch == 16
  assert common.parse_variant("Mu") == (dict(width=64, depth=2, mlp_dim=256, num_heads=2), None)
  assert common.VARIANTS["Pico"] == dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  assert common.resolve_dims("L/14", depth=3)["depth"] == 3
  assert common.resolve_dims("L/14")["patch_size"] == 14
  for bad in ("X/16", "B/x", "", "B/0"):
    with pytest.raises(ValueError):
      common.parse_variant(bad)
  with pytest.raises(ValueError):
    common.resolve_dims("Pico", num_heads=3)  # 32 % 3 != 0
  assert common.grid_size((16, 24), 8) == (2, 3) and common.num_patches(224, 16) == 196
  assert common.grid_size(384, 14) == (27, 27)  # floors like the VALID conv (SigLIP So400m)
  with pytest.raises(ValueError):
    common.grid_size(6, 8)


def test_sincos_2d_matches_formula():
  h, w, d = 3, 4, 16
  table = common.sincos_posemb_2d(h, w, d)
  assert table.shape == (h * w, d) and table.dtype == np.float32
  y, x = 2, 3
  omega = 1.0 / 10000 ** (np.arange(4) / 4)
  want = np.concatenate([np.sin(y * omega), np.cos(y * omega),
                         np.sin(x * omega), np.cos(x * omega)])
  np.testing.assert_allclose(table[y * w + x], want, atol=1e-6)


def test_sincos_3d_shape_layout_and_distinct_rows():
  t, h, w, d = 3, 2, 3, 32
  table = common.sincos_posemb_3d(t, h, w, d)
  assert table.shape == (t, h * w, d)
  rows = table.reshape(-1, d)
  dists = np.linalg.norm(rows[:, None] - rows[None], axis=-1)
  assert np.all(dists[~np.eye(len(rows), dtype=bool)] > 1e-3)  # every (t, y, x) distinct
  # UMT layout: first d/4 channels time, the rest the 2-D table.
  np.testing.assert_allclose(table[:, :, d // 4:],
                             np.broadcast_to(common.sincos_posemb_2d(h, w, 3 * d // 4),
                                             (t, h * w, 3 * d // 4)))
  omega = 1.0 / 10000 ** (np.arange(4) / 4)
  np.testing.assert_allclose(table[2, 5, :d // 4],
                             np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]), atol=1e-6)
  # An image (t=1) gets exactly frame 0 of any video.
  np.testing.assert_array_equal(common.sincos_posemb_3d(1, h, w, d)[0], table[0])
  with pytest.raises(ValueError):
    common.sincos_posemb_3d(2, 2, 2, 40)


# ----------------------------------------------------------------------------- vit
IMG = (16, 24)  # grid 2 x 3 at patch 8 -> N = 6


@pytest.fixture(scope="module")
def vit_setup():
  model = vit.VideoViT("Pico/8", num_frames=2, image_size=IMG, depth=2)
  video = jax.random.normal(jax.random.key(1), (2, 2, *IMG, 3))
  params = nn.unbox(model.init(KEY, video))
  return model, params, video


def _np_patch_embed(video, params, p):
  b, t, h, w, c = video.shape
  x = np.asarray(video).reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  x = x.reshape(b, t, (h // p) * (w // p), p * p * c)
  kern = np.asarray(params["params"]["embedding"]["kernel"]).reshape(p * p * c, -1)
  return x @ kern + np.asarray(params["params"]["embedding"]["bias"])


def test_vit_shapes_and_images(vit_setup):
  model, params, video = vit_setup
  assert model.num_patches == 6 and model.grid == (2, 3)
  keep = jnp.asarray(np.tile([[0, 2, 5]], (2, 2, 1)), jnp.int32)
  tokens, aux = model.apply(params, video, keep)
  assert tokens.shape == (2, 2, 3, 32) and tokens.dtype == jnp.float32
  assert aux["patches"].shape == (2, 2, 6, 32) and aux["encoder_input"].shape == (2, 2, 3, 32)
  # T = 1 (images): positions are those of a video's first frame.
  img_tokens, img_aux = model.apply(params, video[:, :1])
  assert img_tokens.shape == (2, 1, 6, 32)
  np.testing.assert_allclose(img_aux["patches"][:, 0], aux["patches"][:, 0], atol=1e-5)
  with pytest.raises(ValueError, match="frames"):
    model.apply(params, jnp.concatenate([video, video[:, :1]], axis=1))
  with pytest.raises(ValueError, match="keep_idx"):
    model.apply(params, video, keep[:, :1])
  with pytest.raises(ValueError, match="built for"):
    model.apply(params, video[:, :, :8])


def test_vit_keep_idx_gathers_position_embedded_patches(vit_setup):
  model, params, video = vit_setup
  rng = np.random.default_rng(0)
  keep = np.stack([np.stack([np.sort(rng.permutation(6)[:4]) for _ in range(2)])
                   for _ in range(2)]).astype(np.int32)
  _, aux_all = model.apply(params, video)
  _, aux_keep = model.apply(params, video, jnp.asarray(keep))
  # Independent reference: numpy patch embedding + the fixed 3-D table, then gather.
  want_all = _np_patch_embed(video, params, 8) + common.sincos_posemb_3d(2, 2, 3, 32)[None]
  np.testing.assert_allclose(aux_all["patches"], want_all, atol=1e-4)
  want_keep = np.take_along_axis(want_all, keep[..., None], axis=2)
  np.testing.assert_allclose(aux_keep["encoder_input"], want_keep, atol=1e-4)


def test_vit_keep_all_equals_none_and_permutes(vit_setup):
  model, params, video = vit_setup
  tok_none, _ = model.apply(params, video)
  all_idx = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 2, 6))
  tok_all, _ = model.apply(params, video, all_idx)
  np.testing.assert_allclose(tok_all, tok_none, atol=1e-5)
  # Positions ride with the tokens, so reordering the kept indices reorders the outputs.
  tok_rev, _ = model.apply(params, video, all_idx[..., ::-1])
  np.testing.assert_allclose(tok_rev, tok_none[:, :, ::-1], atol=1e-4)
  tok_sub, _ = model.apply(params, video, all_idx[..., :3])
  assert not np.allclose(tok_sub, tok_none[:, :, :3], atol=1e-3)  # fewer tokens, other context


def test_vit_bfloat16_compute_keeps_float32_params():
  model = vit.VideoViT("Pico/8", num_frames=1, image_size=8, dtype=jnp.bfloat16)
  variables = model.init(KEY, jnp.ones((1, 1, 8, 8, 3)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  tokens, _ = model.apply(variables, jnp.ones((1, 1, 8, 8, 3)))
  assert tokens.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- text
VOCAB, LEN = 40, 8


@pytest.fixture(scope="module")
def text_setup():
  model = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=3, num_fusion_layers=1)
  ids = jnp.asarray([[1, 5, 7, 9, 0, 0, 0, 0], [1, 3, 4, 0, 0, 0, 0, 0]], jnp.int32)
  video = jax.random.normal(jax.random.key(2), (2, 5, 48))  # Dv=48 != D=32: projected
  params = nn.unbox(model.init(KEY, ids, video))
  return model, params, ids, video


def test_text_param_layout(text_setup):
  model, params, _, _ = text_setup
  p = params["params"]
  assert set(p["text_encoder"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  assert set(p["fusion_encoder"]) == {"encoderblock_0", "encoder_norm"}
  assert set(p["fusion_encoder"]["encoderblock_0"]) == {
      "LayerNorm_0", "MultiHeadDotProductAttention_0", "cross_norm", "cross_attention",
      "LayerNorm_1", "MlpBlock_0"}
  assert p["video_proj"]["kernel"].shape == (48, 32)
  with pytest.raises(ValueError):
    text.TextEncoder(VOCAB, LEN, "Pico", num_fusion_layers=2).init(
        KEY, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 2, 32)))


def test_text_padding_mask(text_setup):
  model, params, ids, _ = text_setup
  hidden = model.apply(params, ids, method=model.encode)
  assert hidden.shape == (2, LEN, 32)
  # Padding after the real tokens (here: dropping it altogether) leaves them unchanged.
  short = model.apply(params, ids[:1, :4], method=model.encode)
  np.testing.assert_allclose(hidden[:1, :4], short, atol=1e-5)
  # So does whatever the pad embedding is.
  p2 = jax.tree.map(lambda x: x, params)
  p2["params"]["token_embedding"]["embedding"] = (
      params["params"]["token_embedding"]["embedding"].at[0].add(3.0))
  np.testing.assert_allclose(model.apply(p2, ids, method=model.encode)[:, 0], hidden[:, 0],
                             atol=1e-5)
  # Control: without the mask (pad_id that never occurs) the padding does leak in.
  nomask = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=3, pad_id=-1)
  assert not np.allclose(nomask.apply(params, ids, method=nomask.encode)[:, 0], hidden[:, 0],
                         atol=1e-4)
  # And a real token does change the sentence feature.
  changed = model.apply(params, ids.at[0, 2].set(11), method=model.encode)
  assert not np.allclose(changed[0, 0], hidden[0, 0], atol=1e-4)


def test_fuse_depends_on_video_and_respects_video_mask(text_setup):
  model, params, ids, video = text_setup
  hidden = model.apply(params, ids, method=model.encode)
  tmask = text.padding_mask(ids)
  fused = model.apply(params, hidden, tmask, video, method=model.fuse)
  assert fused.shape == (2, LEN, 32)
  other = model.apply(params, hidden, tmask, video + 1.0, method=model.fuse)
  assert not np.allclose(fused, other, atol=1e-4)
  vmask = jnp.asarray([[True, True, True, False, False]] * 2)
  a = model.apply(params, hidden, tmask, video, vmask, method=model.fuse)
  b = model.apply(params, hidden, tmask, video.at[:, 3:].set(5.0), vmask, method=model.fuse)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert not np.allclose(a, fused, atol=1e-4)


def test_mlm_logits_tied_head_matches_numpy(text_setup):
  model, params, ids, _ = text_setup
  hidden = model.apply(params, ids, method=model.encode)
  logits = model.apply(params, hidden, method=model.mlm_logits)
  p = jax.tree.map(np.asarray, params["params"])
  h = np.asarray(hidden) @ p["mlm_dense"]["kernel"] + p["mlm_dense"]["bias"]
  h = _np_layer_norm(_np_gelu(h), p["mlm_norm"])
  want = h @ p["token_embedding"]["embedding"].T + p["mlm_bias"]
  assert logits.shape == (2, LEN, VOCAB)
  np.testing.assert_allclose(logits, want, atol=1e-4)


def test_text_dropout_only_in_training(text_setup):
  _, params, ids, _ = text_setup
  model = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=3, dropout=0.5)
  run = lambda seed: model.apply(params, ids, method=model.encode, train=True,
                                 rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(run(1), run(2), atol=1e-3)
  base = text_setup[0].apply(params, ids, method=text_setup[0].encode)
  np.testing.assert_allclose(model.apply(params, ids, method=model.encode), base, atol=1e-6)


class _Parent(nn.Module):
  """A parent that encodes once and fuses twice (VTM positives and negatives)."""

  @nn.compact
  def __call__(self, ids, video):
    enc = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=2, name="text")
    hidden = enc.encode(ids)
    mask = text.padding_mask(ids)
    pos = enc.fuse(hidden, mask, video)
    neg = enc.fuse(hidden, mask, video[::-1])
    return hidden, pos, neg, enc.mlm_logits(pos)


def test_text_submodule_shares_params():
  ids = jnp.asarray([[1, 5, 7, 0], [1, 3, 0, 0]], jnp.int32)
  video = jax.random.normal(KEY, (2, 3, 32))
  parent = _Parent()
  params = nn.unbox(parent.init(KEY, ids, video))
  assert set(params["params"]) == {"text"}
  assert "video_proj" not in params["params"]["text"]  # Dv == D: no projection
  hidden, pos, neg, _ = parent.apply(params, ids, video)
  child = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=2)
  sub = {"params": params["params"]["text"]}
  np.testing.assert_allclose(
      neg, child.apply(sub, hidden, text.padding_mask(ids), video[::-1], method=child.fuse),
      atol=1e-5)
  assert not np.allclose(pos, neg, atol=1e-4)


# ----------------------------------------------------------------------------- siglip
def test_siglip_b16_param_names_and_shapes():
  model = siglip.SigLIP("B/16", image_size=224, vocab_size=32_000, text_len=64)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 64), jnp.int32))
  flat = {k: v.shape for k, v in _flat(nn.unbox(shapes)).items()}
  mha = "MultiHeadDotProductAttention_0"
  expected = {
      "params/img/embedding/kernel": (16, 16, 3, 768),
      "params/img/embedding/bias": (768,),
      "params/img/pos_embedding": (1, 196, 768),
      f"params/img/Transformer/encoderblock_0/{mha}/query/kernel": (768, 12, 64),
      f"params/img/Transformer/encoderblock_0/{mha}/query/bias": (12, 64),
      f"params/img/Transformer/encoderblock_11/{mha}/out/kernel": (12, 64, 768),
      "params/img/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel": (768, 3072),
      "params/img/Transformer/encoderblock_3/MlpBlock_0/Dense_1/bias": (768,),
      "params/img/Transformer/encoderblock_5/LayerNorm_1/scale": (768,),
      "params/img/Transformer/encoder_norm/scale": (768,),
      "params/img/MAPHead_0/probe": (1, 1, 768),
      f"params/img/MAPHead_0/{mha}/key/kernel": (768, 12, 64),
      "params/img/MAPHead_0/LayerNorm_0/bias": (768,),
      "params/img/MAPHead_0/MlpBlock_0/Dense_1/kernel": (3072, 768),
      "params/txt/Embed_0/embedding": (32_000, 768),
      "params/txt/pos_embedding": (1, 64, 768),
      f"params/txt/Encoder_0/encoderblock_0/{mha}/value/kernel": (768, 12, 64),
      "params/txt/Encoder_0/encoderblock_11/LayerNorm_0/scale": (768,),
      "params/txt/Encoder_0/encoder_norm/bias": (768,),
      "params/txt/head/kernel": (768, 768),
      "params/t": (1,),
      "params/b": (1,),
  }
  for name, shape in expected.items():
    assert flat.get(name) == shape, (name, flat.get(name), shape)
  assert not any(k.startswith("params/img/head") for k in flat)  # SigLIP: no image head
  assert set(shapes["params"]) == {"img", "txt", "t", "b"}
  block = shapes["params"]["img"]["Transformer"]["encoderblock_0"]
  assert set(block) == {"LayerNorm_0", mha, "LayerNorm_1", "MlpBlock_0"}
  assert not any("encoderblock_12" in k for k in flat)
  n_params = sum(int(np.prod(s)) for s in flat.values())
  assert 200e6 < n_params < 206e6, n_params  # published SigLIP B/16: ~203M
  specs = _flat(nn.get_partition_spec(shapes))
  assert tuple(specs[f"params/img/Transformer/encoderblock_0/{mha}/query/kernel"]) == (
      "embed", "heads", "kv")


@pytest.fixture(scope="module")
def siglip_setup():
  model = siglip.SigLIP("Pico/8", image_size=16, vocab_size=VOCAB, text_len=LEN)
  images = jax.random.uniform(jax.random.key(3), (3, 16, 16, 3), minval=-1, maxval=1)
  ids = jax.random.randint(jax.random.key(4), (3, LEN), 1, VOCAB)
  params = nn.unbox(model.init(KEY, images, ids))
  return model, params, images, ids


def test_siglip_shapes_and_map_pool_equals_encode_image(siglip_setup):
  model, params, images, ids = siglip_setup
  zimg, ztxt, aux = model.apply(params, images, ids)
  assert zimg.shape == (3, 32) and ztxt.shape == (3, 32)
  assert aux["img/tokens"].shape == (3, 4, 32)
  np.testing.assert_allclose(aux["t"], np.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(aux["b"], -10.0)
  zimg2, aux2 = model.apply(params, images, method=model.encode_image)
  np.testing.assert_allclose(zimg2, zimg, atol=1e-6)
  pooled = model.apply(params, aux2["tokens"], method=model.map_pool)
  np.testing.assert_allclose(pooled, zimg, atol=1e-5)
  # A masked-out extra key changes nothing, whatever it holds.
  padded = jnp.concatenate([aux2["tokens"], jnp.full((3, 2, 32), 7.0)], axis=1)
  mask = jnp.arange(6)[None] < 4
  np.testing.assert_allclose(
      model.apply(params, padded, jnp.broadcast_to(mask, (3, 6)), method=model.map_pool),
      zimg, atol=1e-5)
  with pytest.raises(ValueError):
    model.apply(params, images[:, :8], method=model.encode_image)


@pytest.mark.parametrize("out_dim", [None, 24])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_map_pool_windows_equals_map_pool_over_explicit_windows(out_dim, k):
  # The MRM target pools every token's k x k window once per token (keys/values projected
  # once); it must equal the MAP head run on each window built explicitly, borders included.
  from clusterstm_jax import teacher as teacher_lib
  model = siglip.SigLIP("Pico/8", image_size=(32, 40), vocab_size=VOCAB, text_len=LEN,
                        out_dim=out_dim)
  images = jax.random.uniform(jax.random.key(5), (2, 32, 40, 3), minval=-1, maxval=1)
  ids = jax.random.randint(jax.random.key(6), (2, LEN), 1, VOCAB)
  params = nn.unbox(model.init(KEY, images, ids))
  tokens = jax.random.normal(jax.random.key(7), (2, 3, 20, 32))  # B=2, T=3, 4x5 grid
  windows, mask = teacher_lib.relevance_windows(tokens, (4, 5), k)
  want = model.apply(params, windows, mask, method=model.map_pool).reshape(2, 3, 20, -1)
  t = teacher_lib.Teacher(model=model, params=params["params"], param_shardings=None)
  got = t.relevance_tokens(params["params"], tokens, (4, 5), k)
  assert got.shape == want.shape == (2, 3, 20, out_dim or 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_map_pool_single_token_matches_numpy(siglip_setup):
  model, params, images, _ = siglip_setup
  _, aux = model.apply(params, images, method=model.encode_image)
  tokens = np.asarray(aux["tokens"]).reshape(-1, 1, 32)  # every token alone: [M, 1, D]
  got = model.apply(params, jnp.asarray(tokens), method=model.map_pool)
  # With one key the softmax is 1: the output is out(value(token)) + MLP residual.
  p = jax.tree.map(np.asarray, params["params"]["img"]["MAPHead_0"])
  att = p["MultiHeadDotProductAttention_0"]
  v = np.einsum("md,dhk->mhk", tokens[:, 0], att["value"]["kernel"]) + att["value"]["bias"]
  x = np.einsum("mhk,hkd->md", v, att["out"]["kernel"]) + att["out"]["bias"]
  y = _np_layer_norm(x, p["LayerNorm_0"])
  mlp = p["MlpBlock_0"]
  y = _np_gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  want = x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_siglip_image_head_and_text_last_pooling():
  model = siglip.SigLIP("Pico/8", image_size=8, vocab_size=VOCAB, text_len=4, out_dim=16)
  images, ids = jnp.ones((2, 8, 8, 3)), jnp.asarray([[2, 3, 4, 1], [5, 6, 7, 1]])
  params = nn.unbox(model.init(KEY, images, ids))
  assert params["params"]["img"]["head"]["kernel"].shape == (32, 16)
  params["params"]["img"]["head"]["kernel"] = jax.random.normal(KEY, (32, 16))
  zimg, aux = model.apply(params, images, method=model.encode_image)
  assert zimg.shape == (2, 16)
  np.testing.assert_allclose(model.apply(params, aux["tokens"], method=model.map_pool), zimg,
                             atol=1e-5)
  # No text mask: every position, including trailing pads/EOS, is seen by the last token.
  z = model.apply(params, ids, method=model.encode_text)
  z2 = model.apply(params, ids.at[:, 0].set(9), method=model.encode_text)
  assert z.shape == (2, 16) and not np.allclose(z, z2, atol=1e-5)


def _np_sigmoid_loss(zimg, ztxt, t, b):
  zi = zimg / np.linalg.norm(zimg, axis=1, keepdims=True)
  zt = ztxt / np.linalg.norm(ztxt, axis=1, keepdims=True)
  n, total = len(zi), 0.0
  for i in range(n):
    for j in range(n):
      logit = float(zi[i] @ zt[j]) * np.exp(t) + b
      label = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-label * logit))
  return total / n


def test_sigmoid_loss_matches_numpy():
  rng = np.random.default_rng(0)
  zimg, ztxt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  for t, b in [(np.log(10.0), -10.0), (0.3, 1.5)]:
    got = siglip.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray([t]),
                              jnp.asarray([b]))
    np.testing.assert_allclose(got, _np_sigmoid_loss(zimg, ztxt, t, b), rtol=1e-5)
  with pytest.raises(ValueError):
    siglip.sigmoid_loss(jnp.ones((3, 4)), jnp.ones((2, 4)), 0.0, 0.0)


# ----------------------------------------------------------------------------- sharding
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("vocab", "tensor"))


def _sharded_vs_plain(model, *args, **apply_kw):
  """Born-sharded init under a mesh + rules, jitted apply; returns (sharded out, plain out)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  abstract = jax.eval_shape(model.init, KEY, *args)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    params = jax.jit(model.init, out_shardings=shardings)(KEY, *args)
    sharded = jax.jit(lambda p, *a: model.apply(p, *a, **apply_kw))(params, *args)
  plain = jax.jit(lambda p, *a: model.apply(p, *a, **apply_kw))(
      jax.device_get(nn.unbox(params)), *args)
  return params, sharded, plain


def test_vit_born_sharded_under_mesh_matches_plain():
  model = vit.VideoViT("Pico/8", num_frames=2, image_size=16)
  video = jax.random.normal(KEY, (4, 2, 16, 16, 3))
  keep = jnp.zeros((4, 2, 2), jnp.int32).at[..., 1].set(3)
  params, (sharded, _), (plain, _) = _sharded_vs_plain(model, video, keep)
  block = params["params"]["Transformer"]["encoderblock_0"]
  assert tuple(block["MlpBlock_0"]["Dense_0"]["kernel"].value.sharding.spec) == (
      "fsdp", "tensor")
  assert tuple(block["MultiHeadDotProductAttention_0"]["query"]["kernel"].value.sharding.spec
               ) == ("fsdp", "tensor", None)
  np.testing.assert_allclose(sharded, plain, atol=1e-5)


def test_text_born_sharded_under_mesh_matches_plain():
  model = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=2)
  ids = jnp.asarray([[1, 5, 7, 9, 0, 0, 0, 0]] * 4, jnp.int32)
  video = jax.random.normal(KEY, (4, 3, 48))
  params, sharded, plain = _sharded_vs_plain(model, ids, video)
  assert tuple(params["params"]["token_embedding"]["embedding"].value.sharding.spec) == (
      "tensor", "fsdp")
  for key in ("hidden", "fused", "mlm_logits"):
    np.testing.assert_allclose(sharded[key], plain[key], atol=1e-4)
