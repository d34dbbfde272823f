"""The frozen teacher: a SigLIP two-tower image-text model (its sigmoid loss: losses.py).

Parameter names and shapes follow big_vision's `proj/image_text/two_towers.py` as used by the
public SigLIP checkpoints (model_cfg: image=dict(variant, pool_type='map'),
text=dict(variant, vocab_size), out_dim=(None, D), temperature_init=10, bias_init=-10):

  img/embedding/{kernel [p,p,3,D], bias}     img/pos_embedding [1, N, D]  (learned)
  img/Transformer/encoderblock_{i}/...       img/Transformer/encoder_norm
  img/MAPHead_0/{probe [1,1,D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
  img/head (only with an image out_dim)
  txt/Embed_0/embedding [V, D]   txt/pos_embedding [1, L, D]   txt/Encoder_0/...   txt/head
  t [1] (log temperature)   b [1] (bias)

As in big_vision, the text tower has no attention mask and pools the LAST token (SigLIP pads
with the sticky EOS token); images are expected in [-1, 1].

`load` maps the public checkpoints into these params: big_vision SigLIP `.npz` files (same
names) and transformers SiglipModel safetensors (renamed and transposed). The text tower only
makes sense with the checkpoint's own SentencePiece model (and SigLIP's text preprocessing:
lower-case, no BOS, EOS then EOS-padding to text_len): give its path as the teacher's tokenizer.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import common

_part = nn.with_logical_partitioning


class _ImageTower(nn.Module):
  """big_vision ViT with pool_type='map'. Attribute names below ARE the param names."""
  dims: dict
  image_size: Any
  out_dim: int | None
  dropout: float
  dtype: Any
  remat: str = "none"

  def setup(self):
    d, p = self.dims["width"], self.dims["patch_size"]
    n = common.num_patches(self.image_size, p)
    self.embedding = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        kernel_init=_part(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=_part(nn.initializers.zeros, ("embed",)))
    self.pos_embedding = self.param(
        "pos_embedding", _part(nn.initializers.normal(stddev=1 / np.sqrt(d)),
                               (None, None, "embed")), (1, n, d), jnp.float32)
    self.Transformer = common.Encoder(  # pylint: disable=invalid-name
        self.dims["depth"], self.dims["mlp_dim"], self.dims["num_heads"], self.dropout,
        dtype=self.dtype, remat=self.remat)
    self.MAPHead_0 = common.MAPHead(  # pylint: disable=invalid-name
        self.dims["mlp_dim"], self.dims["num_heads"], dtype=self.dtype, width=d)
    self.embed_dropout = nn.Dropout(rate=self.dropout)
    if self.out_dim:
      # big_vision zero-initialises the classification/projection head.
      self.head = nn.Dense(self.out_dim, dtype=self.dtype,
                           kernel_init=_part(nn.initializers.zeros, ("embed", None)),
                           bias_init=_part(nn.initializers.zeros, (None,)))

  def pool(self, tokens, mask=None):
    """MAP head (+ head if any) on [M, k, D] tokens -> [M, out]."""
    x = self.MAPHead_0(tokens, mask)
    return (self.head(x) if self.out_dim else x), x

  def pool_windows(self, grid, k):
    """MAP head (+ head if any) of every k x k window of grid [M, h, w, D] -> [M, h, w, out]."""
    x = self.MAPHead_0.windows(grid, k)
    return self.head(x) if self.out_dim else x

  def __call__(self, images, *, train: bool = False):
    x = self.embedding(images.astype(self.dtype))
    n, h, w, d = x.shape
    x = jnp.reshape(x, (n, h * w, d)) + self.pos_embedding.astype(x.dtype)
    x = self.embed_dropout(x, deterministic=not train)
    tokens, enc = self.Transformer(x, deterministic=not train)
    z, pre_logits = self.pool(tokens)
    return z, {"tokens": tokens, "pre_logits": pre_logits, "encoder": enc}


class _TextTower(nn.Module):
  """big_vision text_transformer with pool_type='last'."""
  dims: dict
  vocab_size: int
  text_len: int
  out_dim: int | None
  dropout: float
  dtype: Any
  remat: str = "none"

  def setup(self):
    d = self.dims["width"]
    self.Embed_0 = nn.Embed(  # pylint: disable=invalid-name
        self.vocab_size, d, dtype=self.dtype,
        embedding_init=_part(nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                              out_axis=0), ("vocab", "embed")))
    self.pos_embedding = self.param(
        "pos_embedding", _part(nn.initializers.normal(stddev=1 / np.sqrt(d)),
                               (None, None, "embed")), (1, self.text_len, d), jnp.float32)
    self.Encoder_0 = common.Encoder(  # pylint: disable=invalid-name
        self.dims["depth"], self.dims["mlp_dim"], self.dims["num_heads"], self.dropout,
        dtype=self.dtype, remat=self.remat)
    if self.out_dim:
      self.head = nn.Dense(self.out_dim, dtype=self.dtype,
                           kernel_init=_part(nn.initializers.lecun_normal(), ("embed", None)),
                           bias_init=_part(nn.initializers.zeros, (None,)))

  def __call__(self, ids, *, train: bool = False):
    x = self.Embed_0(ids) + self.pos_embedding.astype(self.dtype)
    x, _ = self.Encoder_0(x, deterministic=not train)
    x = x[:, -1]  # 'last' pooling: the sticky EOS token
    return self.head(x) if self.out_dim else x


class SigLIP(nn.Module):
  """Two-tower SigLIP teacher.

  out_dim: None -> SigLIP's (None, image width): no image head, text head to the image width;
  an int -> both towers get a head of that size; a pair (img, txt), either may be None.
  text_variant: size name of the text tower (default: the image variant's name).
  Outputs are NOT normalised; `sigmoid_loss` normalises.
  """
  variant: str = "Pico/8"
  image_size: int | tuple[int, int] = 224
  vocab_size: int = 32_000
  text_len: int = 64
  out_dim: Any = None
  text_variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  dropout: float = 0.0
  temperature_init: float = 10.0
  bias_init: float = -10.0
  dtype: Any = jnp.float32
  remat: str = "none"  # common.REMAT_POLICIES name for the blocks of both towers

  def _dims(self):
    img = common.resolve_dims(self.variant, width=self.width, depth=self.depth,
                              mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                              patch_size=self.patch_size)
    if img["patch_size"] is None:
      raise ValueError(f"SigLIP needs a patch size, e.g. variant 'B/16'; got {self.variant!r}")
    txt = common.resolve_dims(self.text_variant or self.variant.split("/")[0])
    if self.out_dim is None:
      out = (None, img["width"])
    elif isinstance(self.out_dim, int):
      out = (self.out_dim, self.out_dim)
    else:
      out = tuple(self.out_dim)
    if len(out) != 2:
      raise ValueError(f"out_dim must be None, an int or an (image, text) pair, got {self.out_dim}")
    if (out[0] or img["width"]) != (out[1] or txt["width"]):
      raise ValueError(f"image and text embeddings differ in size: out_dim={out}, widths "
                       f"{img['width']}/{txt['width']}")
    return img, txt, out

  def setup(self):
    img, txt, out = self._dims()
    self.img = _ImageTower(img, self.image_size, out[0], self.dropout, self.dtype, self.remat)
    self.txt = _TextTower(txt, self.vocab_size, self.text_len, out[1], self.dropout, self.dtype,
                          self.remat)
    t0, b0 = float(np.log(self.temperature_init)), float(self.bias_init)
    self.t = self.param("t", _part(lambda k, s, dt: jnp.full(s, t0, dt), (None,)), (1,),
                        jnp.float32)
    self.b = self.param("b", _part(lambda k, s, dt: jnp.full(s, b0, dt), (None,)), (1,),
                        jnp.float32)

  def encode_image(self, images, *, train: bool = False):
    """images [N,H,W,3] in [-1,1] -> (zimg [N,D], aux): aux['tokens'] [N,n,D] is the
    encoder_norm output before pooling, aux['pre_logits'] the MAP output before the head,
    aux['encoder'] the per-block outputs ('block{i:02d}', 'pre_ln'). zimg and tokens are
    float32 whatever the compute dtype."""
    size = ((self.image_size,) * 2 if isinstance(self.image_size, int)
            else tuple(self.image_size))
    if images.ndim != 4 or tuple(images.shape[1:]) != (*size, 3):
      raise ValueError(f"images must be [N, {size[0]}, {size[1]}, 3], got shape {images.shape}")
    z, aux = self.img(images, train=train)
    return z.astype(jnp.float32), dict(aux, tokens=aux["tokens"].astype(jnp.float32))

  def encode_text(self, ids, *, train: bool = False):
    """ids [N, text_len] int -> ztxt [N, D] (last-token pooled, through the text head)."""
    if ids.ndim != 2 or ids.shape[1] != self.text_len:
      raise ValueError(f"ids must be [N, {self.text_len}], got shape {ids.shape}")
    return self.txt(ids, train=train).astype(jnp.float32)

  def map_pool(self, tokens, mask=None):
    """The image tower's MAP head (+ image head, if any) on arbitrary token sets:
    tokens [M, k, D] (e.g. a token and its spatial neighbours), mask [M, k] (True = use)
    -> [M, D], in the same space as encode_image's zimg."""
    if tokens.ndim != 3:
      raise ValueError(f"map_pool tokens must be [M, k, D], got shape {tokens.shape}")
    return self.img.pool(tokens, mask)[0].astype(jnp.float32)

  def map_pool_windows(self, grid, k: int = 3):
    """map_pool of every token's k x k spatial window (clipped at borders), computed without
    building the windows: grid [M, h, w, D] -> [M, h, w, out]."""
    return self.img.pool_windows(grid, k).astype(jnp.float32)

  def __call__(self, images, ids, *, train: bool = False):
    """-> (zimg, ztxt, aux) unnormalised; aux: 't' (log temperature) and 'b' params [1],
    'img/<key>' for encode_image's aux."""
    zimg, aux_img = self.encode_image(images, train=train)
    ztxt = self.encode_text(ids, train=train)
    aux = {f"img/{k}": v for k, v in aux_img.items()}
    aux.update(t=self.t, b=self.b)
    return zimg, ztxt, aux


# ----------------------------------------------------------------------------- pretrained
def _from_big_vision(src: cio.Source, out: cio.Converted, grid) -> None:
  prefix = next((p for p in ("params/", "opt/target/", "") if f"{p}img/embedding/kernel" in src),
                None)
  if prefix is None:
    raise cio.CheckpointError(f"{src.path} is not a big_vision SigLIP checkpoint: no "
                              f"'[params/]img/embedding/kernel' key")
  for name in out.tshapes:  # what is not there is reported as missing, all names at once
    if prefix + name not in src:
      continue
    if name == "img/pos_embedding":
      n = out.tshapes[name][1]
      out.put(name, cio.resample_posemb(src.take(prefix + name), grid or cio.square_grid(n)),
              prefix + name)
    else:
      out.take(name, prefix + name)
  src.ignore_outside(prefix, f"not under {prefix!r}: not model parameters")


def _put_map_head(out: cio.Converted, ours: str, hf: str) -> None:
  """transformers' SiglipMultiheadAttentionPoolingHead (torch nn.MultiheadAttention with a
  packed in_proj [3D, D]) -> big_vision's MAPHead."""
  src = out.source
  out.take(f"{ours}/probe", f"{hf}.probe")
  w, b = src.take(f"{hf}.attention.in_proj_weight"), src.take(f"{hf}.attention.in_proj_bias")
  qkv = [(wi, bi) for wi, bi in zip(np.split(w, 3), np.split(b, 3))]
  o = (src.take(f"{hf}.attention.out_proj.weight"), src.take(f"{hf}.attention.out_proj.bias"))
  cio.put_attention(out, f"{ours}/MultiHeadDotProductAttention_0", *qkv, o, f"{hf}.attention")
  cio.put_hf_layer_norm(out, f"{ours}/LayerNorm_0", f"{hf}.layernorm")
  cio.put_hf_linear(out, f"{ours}/MlpBlock_0/Dense_0", f"{hf}.mlp.fc1")
  cio.put_hf_linear(out, f"{ours}/MlpBlock_0/Dense_1", f"{hf}.mlp.fc2")


def _encoder(out: cio.Converted, ours: str, hf: str, what: str) -> None:
  ours_depth = len({k.split("/")[2] for k in out.tshapes if k.startswith(f"{ours}/encoderblock_")})
  depth = cio.hf_num_layers(out.source, f"{hf}.layers")
  cio.check_depth(out.source, ours_depth, depth, what)
  for i in range(depth):
    cio.put_hf_encoder_layer(out, f"{ours}/encoderblock_{i}", f"{hf}.layers.{i}")


def _from_hf(src: cio.Source, out: cio.Converted, grid) -> None:
  if "vision_model.embeddings.patch_embedding.weight" not in src:
    raise cio.CheckpointError(f"{src.path} is not a transformers SigLIP checkpoint: no key "
                              f"'vision_model.embeddings.patch_embedding.weight'")
  for tower in ("vision_config", "text_config"):
    cfg = (src.hf_config or {}).get(tower, {})
    if cfg.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
      raise cio.CheckpointError(f"{src.path}: {tower}.hidden_act={cfg['hidden_act']!r}, but "
                                f"SigLIP here uses the tanh GELU")
    if not np.isclose(float(cfg.get("layer_norm_eps", 1e-6)), 1e-6, rtol=1e-6, atol=0):
      raise cio.CheckpointError(f"{src.path}: {tower}.layer_norm_eps={cfg['layer_norm_eps']}, "
                                f"but SigLIP here uses 1e-6")
  v, t = "vision_model", "text_model"
  out.take("img/embedding/kernel", f"{v}.embeddings.patch_embedding.weight",
           cio.conv_oihw_to_hwio)
  out.take("img/embedding/bias", f"{v}.embeddings.patch_embedding.bias")
  key = f"{v}.embeddings.position_embedding.weight"
  n = out.tshapes["img/pos_embedding"][1]
  out.put("img/pos_embedding", cio.resample_posemb(src.take(key), grid or cio.square_grid(n)),
          key)
  _encoder(out, "img/Transformer", f"{v}.encoder", "the image encoder")
  cio.put_hf_layer_norm(out, "img/Transformer/encoder_norm", f"{v}.post_layernorm")
  if f"{v}.head.probe" in src:
    _put_map_head(out, "img/MAPHead_0", f"{v}.head")
  out.take("txt/Embed_0/embedding", f"{t}.embeddings.token_embedding.weight")
  out.take("txt/pos_embedding", f"{t}.embeddings.position_embedding.weight", lambda x: x[None])
  _encoder(out, "txt/Encoder_0", f"{t}.encoder", "the text encoder")
  cio.put_hf_layer_norm(out, "txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
  if "txt/head/kernel" in out:
    cio.put_hf_linear(out, "txt/head", f"{t}.head")
  out.take("t", "logit_scale")
  out.take("b", "logit_bias")


def load(path: str | os.PathLike, params_template, *, model: SigLIP | None = None,
         grid: tuple[int, int] | None = None, strict: bool = True):
  """Loads a pretrained SigLIP into teacher params shaped like `params_template`.

  path: a big_vision SigLIP `.npz` (e.g. webli_en_b16_224_63724782.npz; keys
    'params/img/embedding/kernel', ...) or a transformers SiglipModel checkpoint
    (`model.safetensors` or its directory, with config.json beside it for the checks).
  params_template: initialised SigLIP params (the 'params' dict or {'params': ...}).
  model / grid: the image patch grid for resampling `img/pos_embedding` when the model's
    resolution differs from the checkpoint's (default: a square grid).
  strict: unused checkpoint keys are an error (True) or a warning.
  Returns the params tree (numpy arrays); raises CheckpointError (a ValueError) naming what is
  missing, unused or mis-shaped, or the file when it cannot be read.
  """
  src = cio.Source(path)
  out = cio.Converted(src, cio.template_shapes(params_template))
  if grid is None and model is not None:
    grid = common.grid_size(model.image_size, model._dims()[0]["patch_size"])  # pylint: disable=protected-access
  if src.format == "npz":
    _from_big_vision(src, out, grid)
  else:
    _from_hf(src, out, grid)
  return cio.assign(out, params_template, strict=strict)
