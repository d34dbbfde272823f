"""Pretrained-weight loading from big_vision .npz files (written here with numpy) into our
models: the SigLIP teacher, the video ViT (big_vision SigLIP's image tower, original ViT .npz),
and checkpoint_io's helpers. (transformers safetensors: tests/unit/test_pretrained_hf.py.)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import siglip, vit
from tests.unit.pretrained_fixtures import (D, DEPTH, HEADS, IMG, KEY, LEN, MLP, N, P, VOCAB,
                                            filled, flat_params, siglip_teacher)

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------- checkpoint_io
def test_flatten_unflatten_roundtrip():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.ones(3)}
  flat = cio.flatten(tree)
  assert set(flat) == {"a/b", "a/c/d", "e"}
  back = cio.unflatten(flat)
  assert set(back) == {"a", "e"} and set(back["a"]["c"]) == {"d"}


def test_resample_posemb_is_linear_interpolation_with_aligned_corners():
  g, d = 3, 4
  y, x = np.mgrid[:g, :g]
  coef = np.arange(1, d + 1, dtype=np.float64)
  table = (y[..., None] * coef + 2 * x[..., None] * coef).reshape(1, g * g, d)
  np.testing.assert_array_equal(cio.resample_posemb(table, (g, g)), table.astype(np.float32))
  out = cio.resample_posemb(table, (5, 7))
  assert out.shape == (1, 35, d)
  # A function linear in (y, x) is reproduced exactly at the mapped coordinates.
  yy, xx = np.mgrid[:5, :7]
  want = (yy[..., None] * (g - 1) / 4 * coef + 2 * xx[..., None] * (g - 1) / 6 * coef)
  np.testing.assert_allclose(out.reshape(5, 7, d), want, atol=1e-5)
  with pytest.raises(cio.CheckpointError, match="square"):
    cio.resample_posemb(np.ones((1, 6, d)), (2, 2))


# ----------------------------------------------------------------------------- big_vision
def _block_names(prefix):
  mha = prefix + "MultiHeadDotProductAttention_0/"
  names = {mha + f"{q}/kernel": (D, HEADS, D // HEADS) for q in ("query", "key", "value")}
  names.update({mha + f"{q}/bias": (HEADS, D // HEADS) for q in ("query", "key", "value")})
  names.update({mha + "out/kernel": (HEADS, D // HEADS, D), mha + "out/bias": (D,)})
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    names.update({prefix + f"{ln}/scale": (D,), prefix + f"{ln}/bias": (D,)})
  names.update({prefix + "MlpBlock_0/Dense_0/kernel": (D, MLP),
                prefix + "MlpBlock_0/Dense_0/bias": (MLP,),
                prefix + "MlpBlock_0/Dense_1/kernel": (MLP, D),
                prefix + "MlpBlock_0/Dense_1/bias": (D,)})
  return names


def _big_vision_siglip_names():
  """big_vision SigLIP names and shapes (two_towers, image pool_type='map', out_dim=(None, D)),
  written out independently of our modules."""
  names = {"img/embedding/kernel": (P, P, 3, D), "img/embedding/bias": (D,),
           "img/pos_embedding": (1, N, D),
           "img/Transformer/encoder_norm/scale": (D,), "img/Transformer/encoder_norm/bias": (D,),
           "img/MAPHead_0/probe": (1, 1, D),
           "txt/Embed_0/embedding": (VOCAB, D), "txt/pos_embedding": (1, LEN, D),
           "txt/Encoder_0/encoder_norm/scale": (D,), "txt/Encoder_0/encoder_norm/bias": (D,),
           "txt/head/kernel": (D, D), "txt/head/bias": (D,), "t": (1,), "b": (1,)}
  for i in range(DEPTH):
    names.update(_block_names(f"img/Transformer/encoderblock_{i}/"))
    names.update(_block_names(f"txt/Encoder_0/encoderblock_{i}/"))
  head = _block_names("img/MAPHead_0/")  # MAPHead: the same attention/LN_0/MLP children
  names.update({k: v for k, v in head.items() if "LayerNorm_1" not in k})
  return names


def _write_big_vision_npz(path, names, seed=0, **extra):
  rng = np.random.default_rng(seed)
  arrays = {f"params/{k}": rng.normal(size=s).astype(np.float32) for k, s in names.items()}
  arrays["params/t"] = arrays["params/t"].astype(ml_dtypes.bfloat16)  # saved as void, like bv
  arrays.update(extra)
  np.savez(path, **arrays)
  return {k[len("params/"):]: np.asarray(v, np.float32) for k, v in arrays.items()
          if k.startswith("params/")}


@pytest.fixture(scope="module")
def bv_npz(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bv") / "siglip.npz")
  names = _big_vision_siglip_names()
  return path, names, _write_big_vision_npz(path, names)


def test_big_vision_npz_maps_every_teacher_param(bv_npz):
  path, names, values = bv_npz
  model, template = siglip_teacher()
  # Our teacher's names are exactly big_vision's (independent list above).
  assert {k: tuple(v.shape) for k, v in flat_params(template).items()} == names
  params = siglip.load(path, template, model=model)  # strict: nothing unused
  flat = flat_params(params)
  assert set(flat) == set(names)  # none left at init (a ShapeDtypeStruct template has none)
  for k, v in flat.items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, values[k], err_msg=k)


def test_big_vision_npz_resamples_image_positions(bv_npz):
  path, _, values = bv_npz
  model = siglip.SigLIP("Mu/8", image_size=32, vocab_size=VOCAB, text_len=LEN)  # grid 4 x 4
  # The trainer's template: boxed abstract params (eval_shape of init, logical axis names).
  boxed = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, LEN), jnp.int32))
  params = siglip.load(path, boxed, model=model)
  assert isinstance(params["params"]["img"]["pos_embedding"], nn.LogicallyPartitioned)
  params = nn.unbox(params)
  np.testing.assert_allclose(flat_params(params)["img/pos_embedding"],
                             cio.resample_posemb(values["img/pos_embedding"], (4, 4)), atol=1e-6)


def test_big_vision_errors_name_the_parameter_or_file(tmp_path, bv_npz):
  path, names, _ = bv_npz
  model, template = siglip_teacher()
  bad = dict(names, **{"txt/pos_embedding": (1, LEN - 1, D)})
  _write_big_vision_npz(tmp_path / "shape.npz", bad)
  with pytest.raises(cio.CheckpointError, match=r"txt/pos_embedding.*\(1, 7, 64\).*\(1, 8, 64\)"):
    siglip.load(str(tmp_path / "shape.npz"), template)

  missing = {k: v for k, v in names.items() if k not in ("img/MAPHead_0/probe", "b")}
  _write_big_vision_npz(tmp_path / "missing.npz", missing)
  with pytest.raises(cio.CheckpointError, match=r"2 parameter.*missing.*b, img/MAPHead_0/probe"):
    siglip.load(str(tmp_path / "missing.npz"), template)

  extra = {"params/img/extra/kernel": np.ones(3, np.float32)}
  _write_big_vision_npz(tmp_path / "extra.npz", names, **extra)
  with pytest.raises(cio.CheckpointError, match=r"not used.*params/img/extra/kernel"):
    siglip.load(str(tmp_path / "extra.npz"), template)
  loaded = siglip.load(str(tmp_path / "extra.npz"), template, strict=False)  # a warning only
  assert set(flat_params(loaded)) == set(names)

  raw = open(path, "rb").read()
  trunc = tmp_path / "truncated.npz"
  trunc.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(cio.CheckpointError, match="truncated.npz"):
    siglip.load(str(trunc), template)
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    siglip.load(str(tmp_path / "nowhere.npz"), template)
  with pytest.raises(cio.CheckpointError, match="not a big_vision SigLIP"):
    np.savez(tmp_path / "other.npz", w=np.ones(2))
    siglip.load(str(tmp_path / "other.npz"), template)


def test_vit_loads_the_image_tower_of_a_big_vision_siglip(bv_npz):
  path, _, values = bv_npz
  video = jnp.zeros((1, 2, 32, 32, 3))
  learn = vit.VideoViT("Mu/8", num_frames=2, image_size=32, posemb="learn")
  template = filled(learn, video)
  params = vit.load(path, template, model=learn)  # text tower, MAP head, t, b: ignored
  flat = flat_params(nn.unbox(params))
  for k, v in flat.items():
    if k.startswith(("embedding/", "Transformer/")):
      np.testing.assert_array_equal(v, values["img/" + k], err_msg=k)
  np.testing.assert_allclose(flat["pos_embedding"],
                             cio.resample_posemb(values["img/pos_embedding"], (4, 4)), atol=1e-6)
  np.testing.assert_array_equal(flat["time_embedding"], 7.0)  # fresh by design: kept
  # A sin-cos model has no table to load into: the checkpoint's is ignored by design.
  sincos = vit.VideoViT("Mu/8", num_frames=2, image_size=32)
  params = vit.load(path, jax.eval_shape(sincos.init, KEY, video), model=sincos)
  assert "pos_embedding" not in flat_params(params)
  with pytest.raises(cio.CheckpointError, match="quick_gelu"):
    vit.load(path, template, model=learn.clone(mlp_act="quick_gelu"))


def test_vit_loads_an_original_vit_npz_with_pre_linen_names(tmp_path):
  """The original ViT / augreg .npz layout: no 'params/' prefix, pre-linen child numbering,
  the position table under Transformer/posembed_input with a row for the class token."""
  rng = np.random.default_rng(3)
  old = {"embedding/kernel": (P, P, 3, D), "embedding/bias": (D,), "cls": (1, 1, D),
         "Transformer/posembed_input/pos_embedding": (1, N + 1, D),
         "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,),
         "head/kernel": (D, 10), "head/bias": (10,), "pre_logits/kernel": (D, D)}
  rename = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1":
            "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
            "MlpBlock_3": "MlpBlock_0"}
  want = {}
  for i in range(DEPTH):
    for name, shape in _block_names(f"Transformer/encoderblock_{i}/").items():
      old_name = name
      for a, b in rename.items():
        old_name = old_name.replace(f"/{b}/", f"/{a}/")
      old[old_name] = shape
      want[name] = old_name
  arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in old.items()}
  np.savez(tmp_path / "vit.npz", **arrays)
  model = vit.VideoViT("Mu/8", num_frames=2, image_size=IMG, posemb="learn", class_token=True)
  params = vit.load(str(tmp_path / "vit.npz"), filled(model, jnp.zeros((1, 2, IMG, IMG, 3))),
                    model=model)  # head, pre_logits: ignored by design
  flat = flat_params(nn.unbox(params))
  assert any("MlpBlock_3" in k for k in old) and not any("MlpBlock_3" in k for k in flat)
  for name, old_name in want.items():
    np.testing.assert_array_equal(flat[name], arrays[old_name], err_msg=name)
  pos = arrays["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(flat["pos_embedding"], pos[:, 1:])
  np.testing.assert_array_equal(flat["cls"], arrays["cls"] + pos[:, :1])  # big_vision's fix
  np.testing.assert_array_equal(flat["embedding/kernel"], arrays["embedding/kernel"])
