"""Tests of the model modules' common parts (variants, position tables) and of the video ViT,
at tiny 'Pico' sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax.models import common, vit
from tests import helpers

pytestmark = pytest.mark.unit
KEY = jax.random.key(0)


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
  assert "patches" not in aux and aux["encoder_input"].shape == (2, 2, 3, 32)
  _, aux = model.apply(params, video)
  assert aux["patches"].shape == (2, 2, 6, 32)
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


@pytest.mark.parametrize("posemb", ["sincos", "learn"])
def test_vit_embeds_only_the_kept_patches_exactly(posemb):
  """Gather the kept patches' pixels, then embed == embed every patch (the stride-p
  convolution), add positions, then gather: to f32 rounding."""
  model = vit.VideoViT("Pico/8", num_frames=2, image_size=IMG, depth=1, posemb=posemb)
  video = jax.random.normal(jax.random.key(2), (2, 2, *IMG, 3))
  params = nn.unbox(model.init(KEY, video))["params"]
  if posemb == "learn":  # non-zero time positions, so that the test sees them
    params = dict(params, time_embedding=jax.random.normal(KEY, (1, 2, 1, 32)))
  keep = jnp.asarray(np.random.default_rng(1).permuted(
      np.tile(np.arange(6), (2, 2, 1)), axis=-1)[..., :2], jnp.int32)
  _, aux = model.apply({"params": params}, video, keep)
  frames = video.reshape(4, *IMG, 3)
  conv = jax.lax.conv_general_dilated(frames, params["embedding"]["kernel"], (8, 8), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)
  full = (conv + params["embedding"]["bias"]).reshape(2, 2, 6, 32)
  if posemb == "sincos":
    full = full + common.sincos_posemb_3d(2, 2, 3, 32)[None]
  else:
    full = full + params["pos_embedding"][:, None] + params["time_embedding"]
  want = np.take_along_axis(np.asarray(full), np.asarray(keep)[..., None], axis=2)
  np.testing.assert_allclose(aux["encoder_input"], want, rtol=1e-6, atol=1e-6)


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


# ----------------------------------------------------------------------------- sharding
def test_vit_born_sharded_under_mesh_matches_plain():
  model = vit.VideoViT("Pico/8", num_frames=2, image_size=16)
  video = jax.random.normal(KEY, (4, 2, 16, 16, 3))
  keep = jnp.zeros((4, 2, 2), jnp.int32).at[..., 1].set(3)
  params, (sharded, _), (plain, _) = helpers.born_sharded_vs_plain(model, video, keep)
  block = params["params"]["Transformer"]["encoderblock_0"]
  assert tuple(block["MlpBlock_0"]["Dense_0"]["kernel"].value.sharding.spec) == (
      "fsdp", "tensor")
  assert tuple(block["MultiHeadDotProductAttention_0"]["query"]["kernel"].value.sharding.spec
               ) == ("fsdp", "tensor", None)
  np.testing.assert_allclose(sharded, plain, atol=1e-5)
