"""Tests of the text encoder (models/text.py: encoding, fusion with the video, the MLM head) at
tiny 'Pico' sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax.models import text
from tests import helpers

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)
VOCAB, LEN = 40, 8


# ----------------------------------------------------------------------------- text
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
  h = helpers.np_layer_norm(helpers.np_gelu(h), p["mlm_norm"])
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


# ----------------------------------------------------------------------------- sharding
def test_text_born_sharded_under_mesh_matches_plain():
  model = text.TextEncoder(VOCAB, LEN, "Pico", num_layers=2)
  ids = jnp.asarray([[1, 5, 7, 9, 0, 0, 0, 0]] * 4, jnp.int32)
  video = jax.random.normal(KEY, (4, 3, 48))
  params, sharded, plain = helpers.born_sharded_vs_plain(model, ids, video)
  assert tuple(params["params"]["token_embedding"]["embedding"].value.sharding.spec) == (
      "tensor", "fsdp")
  for key in ("hidden", "fused", "mlm_logits"):
    np.testing.assert_allclose(sharded[key], plain[key], atol=1e-4)
