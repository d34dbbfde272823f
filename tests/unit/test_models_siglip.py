"""Tests of the SigLIP teacher (models/siglip.py: towers, MAP pooling, the sigmoid loss) at tiny
'Pico' sizes, and of its B/16 parameter layout from shapes only."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import losses
from clusterstm_jax.models import siglip
from tests import helpers

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)
VOCAB, LEN = 40, 8


# ----------------------------------------------------------------------------- siglip
def test_siglip_b16_param_names_and_shapes():
  model = siglip.SigLIP("B/16", image_size=224, vocab_size=32_000, text_len=64)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 64), jnp.int32))
  flat = {k: v.shape for k, v in helpers.flat(nn.unbox(shapes)).items()}
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
  specs = helpers.flat(nn.get_partition_spec(shapes))
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
  y = helpers.np_layer_norm(x, p["LayerNorm_0"])
  mlp = p["MlpBlock_0"]
  y = helpers.np_gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
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
    got = losses.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray([t]),
                              jnp.asarray([b]))
    np.testing.assert_allclose(got, _np_sigmoid_loss(zimg, ztxt, t, b), rtol=1e-5)
  with pytest.raises(ValueError):
    losses.sigmoid_loss(jnp.ones((3, 4)), jnp.ones((2, 4)), 0.0, 0.0)
