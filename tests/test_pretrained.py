"""Pretrained-weight loading: big_vision .npz and transformers safetensors into our models.

Parity tests (marked `torch`) build tiny, randomly initialised transformers SiglipModel /
CLIPModel on CPU, save them with save_pretrained, load them with our `load()`s and compare
outputs on the same inputs. They are skipped when torch / transformers are not installed.
Everything else runs on numpy-written files only.
"""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import clusterstm, siglip, vit
from configs import pretrain

KEY = jax.random.key(0)
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
torch_only = pytest.mark.skipif(
    not HAS_TORCH, reason="parity tests need torch and transformers "
                          "(pip install -r requirements-test.txt)")
TOL = 1e-4  # max abs difference allowed in float32

# One tiny config for both formats: 'Mu' = width 64, depth 2, mlp 256, 2 heads.
D, DEPTH, MLP, HEADS, P, IMG, VOCAB, LEN = 64, 2, 256, 2, 8, 24, 99, 8
N = (IMG // P) ** 2


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _flat_params(params):
  return cio.flatten(params["params"] if set(params) == {"params"} else params)


def _filled(model, *args, value=7.0):
  """A params template with every value set to `value`: the shapes of model.init without its
  (slow, op-by-op) run. Parameters a loader keeps 'fresh' must come back holding `value`."""
  return jax.tree.map(lambda s: np.full(s.shape, value, s.dtype),
                      jax.eval_shape(model.init, KEY, *args))


# ----------------------------------------------------------------------------- helpers
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


def _teacher(image_size=IMG):
  model = siglip.SigLIP("Mu/8", image_size=image_size, vocab_size=VOCAB, text_len=LEN)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, image_size, image_size, 3)),
                          jnp.zeros((1, LEN), jnp.int32))
  return model, nn.unbox(shapes)


@pytest.fixture(scope="module")
def bv_npz(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bv") / "siglip.npz")
  names = _big_vision_siglip_names()
  return path, names, _write_big_vision_npz(path, names)


def test_big_vision_npz_maps_every_teacher_param(bv_npz):
  path, names, values = bv_npz
  model, template = _teacher()
  # Our teacher's names are exactly big_vision's (independent list above).
  assert {k: tuple(v.shape) for k, v in _flat_params(template).items()} == names
  params = siglip.load(path, template, model=model)  # strict: nothing unused
  flat = _flat_params(params)
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
  np.testing.assert_allclose(_flat_params(params)["img/pos_embedding"],
                             cio.resample_posemb(values["img/pos_embedding"], (4, 4)), atol=1e-6)


def test_big_vision_errors_name_the_parameter_or_file(tmp_path, bv_npz):
  path, names, _ = bv_npz
  model, template = _teacher()
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
  assert set(_flat_params(loaded)) == set(names)

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


def test_truncated_safetensors_names_the_file(tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({"a": np.ones((64, 64), np.float32)}, str(path))
  assert cio.read_safetensors(str(path))["a"].shape == (64, 64)
  raw = path.read_bytes()
  path.write_bytes(raw[:-100])
  with pytest.raises(cio.CheckpointError, match="model.safetensors"):
    cio.read_safetensors(str(path))
  with pytest.raises(cio.CheckpointError, match="model.safetensors"):
    cio.read_safetensors(str(tmp_path))  # the directory form


def test_vit_loads_the_image_tower_of_a_big_vision_siglip(bv_npz):
  path, _, values = bv_npz
  video = jnp.zeros((1, 2, 32, 32, 3))
  learn = vit.VideoViT("Mu/8", num_frames=2, image_size=32, posemb="learn")
  template = _filled(learn, video)
  params = vit.load(path, template, model=learn)  # text tower, MAP head, t, b: ignored
  flat = _flat_params(nn.unbox(params))
  for k, v in flat.items():
    if k.startswith(("embedding/", "Transformer/")):
      np.testing.assert_array_equal(v, values["img/" + k], err_msg=k)
  np.testing.assert_allclose(flat["pos_embedding"],
                             cio.resample_posemb(values["img/pos_embedding"], (4, 4)), atol=1e-6)
  np.testing.assert_array_equal(flat["time_embedding"], 7.0)  # fresh by design: kept
  # A sin-cos model has no table to load into: the checkpoint's is ignored by design.
  sincos = vit.VideoViT("Mu/8", num_frames=2, image_size=32)
  params = vit.load(path, jax.eval_shape(sincos.init, KEY, video), model=sincos)
  assert "pos_embedding" not in _flat_params(params)
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
  params = vit.load(str(tmp_path / "vit.npz"), _filled(model, jnp.zeros((1, 2, IMG, IMG, 3))),
                    model=model)  # head, pre_logits: ignored by design
  flat = _flat_params(nn.unbox(params))
  assert any("MlpBlock_3" in k for k in old) and not any("MlpBlock_3" in k for k in flat)
  for name, old_name in want.items():
    np.testing.assert_array_equal(flat[name], arrays[old_name], err_msg=name)
  pos = arrays["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(flat["pos_embedding"], pos[:, 1:])
  np.testing.assert_array_equal(flat["cls"], arrays["cls"] + pos[:, :1])  # big_vision's fix
  np.testing.assert_array_equal(flat["embedding/kernel"], arrays["embedding/kernel"])


# ----------------------------------------------------------------------------- transformers
def _perturb(model, seed):
  """Random offsets on every parameter: LayerNorm scales != 1, biases != 0, so that a swapped
  or dropped parameter shows up in the outputs."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  import transformers  # pylint: disable=g-import-not-at-top
  tower = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=DEPTH,
               num_attention_heads=HEADS)
  cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=VOCAB, max_position_embeddings=LEN, **tower),
      vision_config=dict(image_size=IMG, patch_size=P, **tower))
  model = _perturb(transformers.SiglipModel(cfg), 0)
  path = str(tmp_path_factory.mktemp("hf_siglip"))
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=LEN),
      vision_config=dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=DEPTH,
                         num_attention_heads=HEADS, image_size=IMG, patch_size=P),
      projection_dim=16)
  model = _perturb(transformers.CLIPModel(cfg), 1)
  path = str(tmp_path_factory.mktemp("hf_clip"))
  model.save_pretrained(path)
  return path, model


def _inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, size=(batch, IMG, IMG, 3)).astype(np.float32)
  ids = rng.integers(0, VOCAB, size=(batch, LEN)).astype(np.int64)
  return images, ids


@torch_only
def test_siglip_safetensors_parity_with_transformers(hf_siglip):
  import torch  # pylint: disable=g-import-not-at-top
  path, hf = hf_siglip
  assert os.path.exists(os.path.join(path, "model.safetensors"))
  model, template = _teacher()
  params = siglip.load(path, template, model=model)
  images, ids = _inputs()
  with torch.no_grad():
    pix, tids = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(ids)
    v_out, t_out = hf.vision_model(pixel_values=pix), hf.text_model(input_ids=tids)
    logits = hf(input_ids=tids, pixel_values=pix).logits_per_image
  zimg, ztxt, aux = model.apply(params, jnp.asarray(images), jnp.asarray(ids, jnp.int32))
  zi = zimg / jnp.linalg.norm(zimg, axis=-1, keepdims=True)
  zt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
  ours_logits = zi @ zt.T * jnp.exp(aux["t"]) + aux["b"]
  diffs = {"image embedding (MAP pooled)": _maxdiff(zimg, v_out.pooler_output),
           "image tokens (post-LN)": _maxdiff(aux["img/tokens"], v_out.last_hidden_state),
           "text embedding (head of last token)": _maxdiff(ztxt, t_out.pooler_output),
           "logits_per_image": _maxdiff(ours_logits, logits)}
  print("\nSigLIP parity, max abs diff:", diffs)
  assert all(d <= TOL for d in diffs.values()), diffs
  assert np.std(np.asarray(zimg)) > 0.1  # not a trivially zero output


@torch_only
def test_clip_vision_safetensors_parity_with_transformers(hf_clip):
  import torch  # pylint: disable=g-import-not-at-top
  path, hf = hf_clip
  opts = vit.options_from_hf_config(path)
  assert opts == dict(width=D, depth=DEPTH, mlp_dim=MLP, num_heads=HEADS, patch_size=P,
                      posemb="learn", class_token=True, pre_norm=True, mlp_act="quick_gelu",
                      ln_eps=1e-5)
  model = vit.VideoViT("Mu/8", num_frames=2, image_size=IMG, **opts)
  # time_embedding keeps the template's value: zero, as model.init gives it.
  template = _filled(model, jnp.zeros((1, 2, IMG, IMG, 3)), value=0.0)
  params = vit.load(path, template, model=model)  # text tower, projections: ignored
  images, _ = _inputs(1)
  with torch.no_grad():
    pix = torch.from_numpy(images).permute(0, 3, 1, 2)
    v_out = hf.vision_model(pixel_values=pix)
    embeds = hf.get_image_features(pixel_values=pix).pooler_output
  tokens, aux = model.apply(nn.unbox(params), jnp.asarray(images)[:, None])  # images: T = 1
  proj = cio.read_safetensors(path)["visual_projection.weight"]
  diffs = {"pooled output (post-LN class token)": _maxdiff(aux["cls"], v_out.pooler_output),
           "image embedding (projected)": _maxdiff(np.asarray(aux["cls"]) @ proj.T, embeds),
           "class token before post-LN": _maxdiff(aux["cls_pre_ln"],
                                                  v_out.last_hidden_state[:, 0]),
           "patch tokens before post-LN": _maxdiff(aux["pre_ln"][:, 0],
                                                   v_out.last_hidden_state[:, 1:])}
  print("\nCLIP vision parity, max abs diff:", diffs)
  assert all(d <= TOL for d in diffs.values()), diffs
  assert tokens.shape == (3, 1, N, D)
  with pytest.raises(cio.CheckpointError, match="pre_layrnorm.*pre_norm=True"):
    plain = vit.VideoViT("Mu/8", num_frames=2, image_size=IMG, posemb="learn",
                         class_token=True, mlp_act="quick_gelu", ln_eps=1e-5)
    vit.load(path, _filled(plain, jnp.zeros((1, 1, IMG, IMG, 3))), model=plain)


@torch_only
def test_student_load_pretrained_from_clip(hf_clip):
  path, _ = hf_clip
  cfg = pretrain.get_config("smoke").model  # the real config, with CLIP's vision options
  with cfg.unlocked():
    cfg.vision_variant = "Mu/8"
    cfg.vision_options = dict(posemb="learn", class_token=True, pre_norm=True,
                              mlp_act="quick_gelu", ln_eps=1e-5)
  student = clusterstm.ClusterSTM(cfg, vocab_size=VOCAB, num_frames=2, image_size=32,
                                  max_text_len=LEN)
  init = _filled(student, jnp.zeros((1, 2, 32, 32, 3)), jnp.ones((1, LEN), jnp.int32))
  loaded = clusterstm.load_pretrained(path, init, student)
  # Logical-axis boxes are kept, so the trainer can shard the result as it shards init.
  assert isinstance(loaded["params"]["vision"]["cls"], nn.LogicallyPartitioned)
  new, old = _flat_params(nn.unbox(loaded)), _flat_params(nn.unbox(init))
  assert set(new) == set(old)
  ckpt = cio.read_safetensors(path)
  pos = ckpt["vision_model.embeddings.position_embedding.weight"]
  np.testing.assert_allclose(new["vision/pos_embedding"], cio.resample_posemb(pos[1:], (4, 4)),
                             atol=1e-6)  # 3 x 3 grid at 24 px -> 4 x 4 at 32 px
  np.testing.assert_allclose(
      new["vision/cls"].reshape(-1), ckpt["vision_model.embeddings.class_embedding"] + pos[0])
  np.testing.assert_allclose(
      new["vision/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"],
      ckpt["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  for k in old:  # everything outside the vision tower keeps its initial value
    if not k.startswith("vision/") or k == "vision/time_embedding":
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)


@torch_only
def test_wrong_shape_safetensors_names_both_keys(hf_siglip, tmp_path):
  path, _ = hf_siglip
  arrays = dict(cio.read_safetensors(path))
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  arrays[key] = np.zeros((MLP + 1, D), np.float32)
  safetensors.numpy.save_file(arrays, str(tmp_path / "model.safetensors"))
  _, template = _teacher()
  with pytest.raises(cio.CheckpointError,
                     match=r"txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/kernel.*"
                           r"text_model.encoder.layers.1.mlp.fc1.weight.*\(64, 257\).*\(64, 256\)"):
    siglip.load(str(tmp_path / "model.safetensors"), template)
  del arrays[key]
  safetensors.numpy.save_file(arrays, str(tmp_path / "model.safetensors"))
  with pytest.raises(cio.CheckpointError, match="text_model.encoder.layers.1.mlp.fc1.weight"):
    siglip.load(str(tmp_path / "model.safetensors"), template)
