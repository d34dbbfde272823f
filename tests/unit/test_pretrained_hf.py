"""Pretrained-weight loading from transformers safetensors into our models.

Parity tests (`torch_only`) build tiny, randomly initialised transformers SiglipModel /
CLIPModel on CPU, save them with save_pretrained, load them with our `load()`s and compare
outputs on the same inputs. They are skipped when torch / transformers are not installed.
(big_vision .npz: tests/unit/test_pretrained_npz.py.)
"""
import importlib.util
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import clusterstm, siglip, vit
from configs import pretrain
from tests.unit.pretrained_fixtures import (D, DEPTH, HEADS, IMG, LEN, MLP, N, P, VOCAB, filled,
                                            flat_params, siglip_teacher)

pytestmark = pytest.mark.unit
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
torch_only = pytest.mark.skipif(
    not HAS_TORCH, reason="parity tests need torch and transformers "
                          "(pip install -r requirements-test.txt)")
TOL = 1e-4  # max abs difference allowed in float32


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- safetensors files
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
  model, template = siglip_teacher()
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
  template = filled(model, jnp.zeros((1, 2, IMG, IMG, 3)), value=0.0)
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
    vit.load(path, filled(plain, jnp.zeros((1, 1, IMG, IMG, 3))), model=plain)


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
  init = filled(student, jnp.zeros((1, 2, 32, 32, 3)), jnp.ones((1, LEN), jnp.int32))
  loaded = clusterstm.load_pretrained(path, init, student)
  # Logical-axis boxes are kept, so the trainer can shard the result as it shards init.
  assert isinstance(loaded["params"]["vision"]["cls"], nn.LogicallyPartitioned)
  new, old = flat_params(nn.unbox(loaded)), flat_params(nn.unbox(init))
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
  _, template = siglip_teacher()
  with pytest.raises(cio.CheckpointError,
                     match=r"txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/kernel.*"
                           r"text_model.encoder.layers.1.mlp.fc1.weight.*\(64, 257\).*\(64, 256\)"):
    siglip.load(str(tmp_path / "model.safetensors"), template)
  del arrays[key]
  safetensors.numpy.save_file(arrays, str(tmp_path / "model.safetensors"))
  with pytest.raises(cio.CheckpointError, match="text_model.encoder.layers.1.mlp.fc1.weight"):
    siglip.load(str(tmp_path / "model.safetensors"), template)
