"""The student's video ViT (UMT style): per-frame patch embedding, fixed sin-cos space-time
position embedding added before dropping tokens, a joint space-time encoder over the visible
tokens only, no CLS token.

Masking hands in `keep_idx` int32 [B, T, Nc]: for each frame, the indices (into the N patches
of that frame, row-major over the patch grid) of the Nc tokens to keep. The invariant "exactly
Nc tokens in every frame" is what makes the shapes static; it is the array's shape here.

Position choice for images: the space-time table is computed from the input's static T at
trace time (sincos_posemb_3d(T, h, w, D)). A T=1 input (an image) therefore gets exactly the
table of a video's first frame; no separate 2-D table and no parameters depend on T.
Names of the patch embedding ('embedding') and encoder ('Transformer/encoderblock_{i}',
'Transformer/encoder_norm') follow big_vision's ViT, so image ViT weights load by name.

Pretrained image towers (`load`, below): image-to-video inflation is per-frame patch
embedding (the 2-D kernel is applied to every frame; no tubelets). Optional attributes, all
off by default (then the parameters are exactly the ones above), match external towers:
  posemb='learn'   a learned spatial table `pos_embedding` [1, N, D] shared by all frames (big_vision
                   name; loaded and resampled from the checkpoint) plus `time_embedding`
                   [1, T, 1, D], zero-initialised, so a loaded image model is unchanged on frame 0.
  class_token      a `cls` token [1, 1, D] (big_vision name; no position of its own: CLIP's class
                   position is folded into it at load) prepended once per clip; its output is
                   aux['cls'] (after encoder_norm, i.e. CLIP's post-LN pooled output).
  pre_norm         a LayerNorm `pre_norm` before the encoder (CLIP's `pre_layrnorm`).
  mlp_act, ln_eps  CLIP: 'quick_gelu', 1e-5 (big_vision/SigLIP: 'gelu_tanh', 1e-6, the default).
CLIP applies its post-LN to the class token only; here `encoder_norm` normalises every output
token (as big_vision does), which leaves the class token's output identical.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import common
from clusterstm_jax.models.common import grid_size, num_patches  # re-exported helpers

__all__ = ["VideoViT", "PatchEmbedding", "patchify", "grid_size", "num_patches", "load",
           "options_from_hf_config"]

_part = nn.with_logical_partitioning


def patchify(video, patch: int, grid: tuple[int, int]):
  """[B,T,H,W,C] -> [B,T,gh*gw, patch*patch*C], row-major over the grid, each patch's pixels in
  (y, x, c) order: the flattening of a [p, p, C, D] convolution kernel. Pixels past the grid
  (H or W not a multiple of p) are dropped, as by a VALID convolution."""
  b, t, _, _, c = video.shape
  gh, gw = grid
  x = video[:, :, :gh * patch, :gw * patch]
  x = x.reshape(b, t, gh, patch, gw, patch, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, gh * gw, patch * patch * c)


class PatchEmbedding(nn.Module):
  """The stride-p p x p patch convolution as a Dense on patchify()'d pixels. Parameters are a
  convolution's (`kernel` [p, p, C, D], `bias` [D]; big_vision's `embedding`), so ViT
  checkpoints load unchanged. __call__(patches [..., p*p*C]) -> [..., D]."""
  width: int
  patch: int
  channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches):
    p, d = self.patch, self.width
    kernel = self.param("kernel", _part(nn.initializers.lecun_normal(),
                                        (None, None, None, "embed")),
                        (p, p, self.channels, d), jnp.float32)
    bias = self.param("bias", _part(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    kernel = jnp.reshape(kernel, (p * p * self.channels, d)).astype(self.dtype)
    return jnp.dot(patches.astype(self.dtype), kernel) + bias.astype(self.dtype)


class VideoViT(nn.Module):
  """__call__(video [B,T,H,W,3], keep_idx [B,T,Nc] | None, *, train) -> (tokens [B,T,Nc,D], aux).

  T must be `num_frames` or 1 (images). aux holds:
    'patches' (keep_idx None only: only the kept patches are embedded): position-embedded
      patch embeddings of every token, [B, T, N, D];
    'encoder_input': the gathered visible ones fed to the encoder, [B, T, Nc, D];
    'pre_ln': encoder output before the final norm, [B, T, Nc, D];
    with class_token: 'cls' [B, D] (after encoder_norm) and 'cls_pre_ln' [B, D].
  Indices outside [0, N) are not checked under jit; the gather then yields NaNs.
  See the module docstring for the optional attributes posemb .. ln_eps.
  """
  variant: str = "Mu/8"
  num_frames: int = 4
  image_size: int | tuple[int, int] = 224
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  posemb: str = "sincos"  # or "learn"
  class_token: bool = False
  pre_norm: bool = False
  mlp_act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  remat: str = "none"  # common.REMAT_POLICIES name for the encoder blocks
  # Stochastic depth: the last block's rate, rising linearly from 0 (common.Encoder). Training
  # only; its randomness is the 'dropout' rng (the step's fold_in(key, step)).
  drop_path: float = 0.0

  @property
  def dims(self) -> dict[str, Any]:
    dims = common.resolve_dims(self.variant, width=self.width, depth=self.depth,
                               mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                               patch_size=self.patch_size)
    if dims["patch_size"] is None:
      raise ValueError(f"VideoViT needs a patch size: use a variant like 'B/16' or patch_size=, "
                       f"got variant {self.variant!r}")
    return dims

  @property
  def grid(self) -> tuple[int, int]:
    return grid_size(self.image_size, self.dims["patch_size"])

  @property
  def num_patches(self) -> int:
    return num_patches(self.image_size, self.dims["patch_size"])

  def _check(self, video, keep_idx):
    if self.posemb not in ("sincos", "learn"):
      raise ValueError(f"posemb must be 'sincos' or 'learn', got {self.posemb!r}")
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be [B, T, H, W, 3], got shape {video.shape}")
    b, t, h, w, _ = video.shape
    size = (self.image_size,) * 2 if isinstance(self.image_size, int) else tuple(self.image_size)
    if (h, w) != size:
      raise ValueError(f"video frames are {(h, w)} but the model was built for {size}")
    if t not in (1, self.num_frames):
      raise ValueError(f"video has {t} frames; this VideoViT takes {self.num_frames} (or 1 for "
                       f"images)")
    if keep_idx is not None:
      if keep_idx.ndim != 3 or keep_idx.shape[:2] != (b, t):
        raise ValueError(f"keep_idx must be [B={b}, T={t}, Nc], got shape {keep_idx.shape}")
      if not jnp.issubdtype(keep_idx.dtype, jnp.integer):
        raise ValueError(f"keep_idx must be integer, got dtype {keep_idx.dtype}")
      if keep_idx.shape[2] > self.num_patches:
        raise ValueError(f"keep_idx keeps {keep_idx.shape[2]} tokens per frame but a frame has "
                         f"only {self.num_patches}")

  @nn.compact
  def __call__(self, video, keep_idx=None, *, train: bool = False):
    self._check(video, keep_idx)
    dims = self.dims
    p, d = dims["patch_size"], dims["width"]
    b, t = video.shape[:2]
    gh, gw = self.grid
    # Every token's position (space-time), each token knows where it was after the gather.
    if self.posemb == "sincos":
      pos = jnp.asarray(common.sincos_posemb_3d(t, gh, gw, d), self.dtype)[None]
    else:
      table = self.param("pos_embedding", _part(nn.initializers.normal(stddev=1 / np.sqrt(d)),
                                                (None, None, "embed")), (1, gh * gw, d),
                         jnp.float32)
      time = self.param("time_embedding", _part(nn.initializers.zeros,
                                                (None, None, None, "embed")),
                        (1, self.num_frames, 1, d), jnp.float32)
      pos = (table[:, None] + time[:, :t]).astype(self.dtype)  # [1, t, N, d]
    # The patch embedding is per patch (a stride-p, p x p convolution), so embedding only the
    # kept patches' pixels gives exactly the kept rows of the full embedding (up to float
    # summation order; tests/unit/test_models_vit.py) at Nc/N of the FLOPs.
    patches = patchify(video.astype(self.dtype), p, (gh, gw))  # [B, T, N, p*p*3]
    if keep_idx is not None:
      idx = keep_idx[..., None].astype(jnp.int32)
      patches = jnp.take_along_axis(patches, idx, axis=2)
      pos = jnp.take_along_axis(jnp.broadcast_to(pos, (b, t, gh * gw, d)), idx, axis=2)
    x = PatchEmbedding(d, p, dtype=self.dtype, name="embedding")(patches) + pos
    aux = {} if keep_idx is not None else {"patches": x}
    aux["encoder_input"] = x
    nc = x.shape[2]

    x = jnp.reshape(x, (b, t * nc, d))  # joint space-time attention over visible tokens
    if self.class_token:
      cls = self.param("cls", _part(nn.initializers.zeros, (None, None, "embed")), (1, 1, d),
                       jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    x = nn.with_logical_constraint(x, common.ACT)
    if self.pre_norm:
      x = common.layer_norm(self.dtype, name="pre_norm", eps=self.ln_eps)(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, out = common.Encoder(dims["depth"], dims["mlp_dim"], dims["num_heads"], self.dropout,
                            dtype=self.dtype, act=self.mlp_act, ln_eps=self.ln_eps,
                            remat=self.remat, drop_path=self.drop_path,
                            name="Transformer")(x, deterministic=not train)
    x = nn.with_logical_constraint(x, common.ACT)
    pre_ln = out["pre_ln"]
    if self.class_token:
      aux["cls"], aux["cls_pre_ln"] = x[:, 0], pre_ln[:, 0]
      x, pre_ln = x[:, 1:], pre_ln[:, 1:]
    aux["pre_ln"] = jnp.reshape(pre_ln, (b, t, nc, d))
    return jnp.reshape(x, (b, t, nc, d)), aux


# ----------------------------------------------------------------------------- pretrained
# transformers' `hidden_act` -> our MLP activation name.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu": "gelu"}

_HEAD_REASON = "pooling/projection head or other tower: the student pools its own tokens"


def _hf_vision_config(cfg: dict) -> dict:
  return cfg.get("vision_config", cfg)


def options_from_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """VideoViT keyword arguments that reproduce a transformers CLIP or SigLIP vision tower,
  from the `config.json` beside `path` (a model directory or its model.safetensors)."""
  cfg = cio.read_hf_config(path)
  if cfg is None:
    raise cio.CheckpointError(f"no config.json beside {path}")
  vc = _hf_vision_config(cfg)
  kind = vc.get("model_type", cfg.get("model_type", ""))
  if not kind.startswith(("clip", "siglip")):
    raise cio.CheckpointError(f"{path}: model_type {kind!r} is neither CLIP nor SigLIP")
  if vc.get("hidden_act") not in HF_ACTIVATIONS:
    raise cio.CheckpointError(f"{path}: unsupported hidden_act {vc.get('hidden_act')!r}")
  clip = kind.startswith("clip")
  return dict(width=vc["hidden_size"], depth=vc["num_hidden_layers"],
              mlp_dim=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
              patch_size=vc["patch_size"], posemb="learn", class_token=clip, pre_norm=clip,
              mlp_act=HF_ACTIVATIONS[vc["hidden_act"]], ln_eps=float(vc["layer_norm_eps"]))


def _check_arch(src: cio.Source, model: VideoViT | None, act: str, eps: float) -> None:
  if model is None:
    return
  if model.mlp_act != act or not np.isclose(model.ln_eps, eps, rtol=1e-6, atol=0):
    raise cio.CheckpointError(
        f"{src.path} was trained with MLP activation {act!r} and LayerNorm eps {eps}, but the "
        f"VideoViT has mlp_act={model.mlp_act!r}, ln_eps={model.ln_eps}")


def _depth(tshapes) -> int:
  return len({k.split("/")[1] for k in tshapes if k.startswith("Transformer/encoderblock_")})


def _put_posemb(src, out, key, table, grid):
  if "pos_embedding" in out:
    n = out.tshapes["pos_embedding"][1]
    out.put("pos_embedding", cio.resample_posemb(table, grid or cio.square_grid(n)), key)
  else:
    src.ignore(key, "VideoViT(posemb='sincos') uses fixed sin-cos positions; build it with "
                    "posemb='learn' to load the checkpoint's table")


def _from_big_vision(src: cio.Source, out: cio.Converted, grid, model) -> None:
  _check_arch(src, model, "gelu_tanh", 1e-6)
  prefixes = ("params/img/", "params/", "opt/target/img/", "opt/target/", "img/", "")
  prefix = next((p for p in prefixes if f"{p}embedding/kernel" in src), None)
  if prefix is None:
    raise cio.CheckpointError(f"{src.path} is not a big_vision ViT/SigLIP checkpoint: no "
                              f"'[params/][img/]embedding/kernel' key")
  renamed = cio.convert_pre_linen(src.arrays)
  if any(new != old for new, old in renamed.items()):
    # Original ViT .npz files (e.g. augreg): pre-linen child names; rename to linen's.
    logging.info("%s: converting pre-linen parameter names", src.path)
    src.arrays = {new: src.arrays[old] for new, old in renamed.items()}
  pos_keys = [prefix + k for k in ("pos_embedding", "Transformer/posembed_input/pos_embedding",
                                   "Transformer/pos_embedding") if prefix + k in src]
  if not pos_keys:
    raise cio.CheckpointError(f"{src.path}: no position embedding under {prefix!r}")
  pos = src.take(pos_keys[0]).reshape(-1, out.tshapes["embedding/kernel"][-1])
  cls_pos = 0.0
  square = lambda n: int(round(np.sqrt(n))) ** 2 == n
  if not square(len(pos)) and square(len(pos) - 1):
    # Old big_vision ViTs added positions after concatenating [cls]: fold that row into cls.
    cls_pos, pos = pos[:1][None], pos[1:]
  _put_posemb(src, out, pos_keys[0], pos, grid)
  if prefix + "cls" in src:
    if "cls" in out:
      out.put("cls", src.take(prefix + "cls") + cls_pos, prefix + "cls")
    else:
      src.ignore(prefix + "cls", "VideoViT(class_token=False) has no class token")
  src.hint(prefix + "cls", "build VideoViT with class_token=True")
  for name in out.tshapes:  # what is not there is reported as missing, all names at once
    if name.startswith(("embedding/", "Transformer/")) and prefix + name in src:
      out.take(name, prefix + name)
  for head in ("MAPHead_0", "head", "pre_logits"):
    src.ignore(prefix + head, _HEAD_REASON)
  src.ignore_outside(prefix, f"outside the image tower {prefix!r} (text tower, logit scale)")


def _from_hf(src: cio.Source, out: cio.Converted, grid, model) -> None:
  p = "vision_model."
  if f"{p}embeddings.patch_embedding.weight" not in src:
    raise cio.CheckpointError(f"{src.path} is not a transformers CLIP/SigLIP vision checkpoint: "
                              f"no key '{p}embeddings.patch_embedding.weight'")
  if src.hf_config is not None:
    vc = _hf_vision_config(src.hf_config)
    act = HF_ACTIVATIONS.get(vc.get("hidden_act"))
    if act is None:
      raise cio.CheckpointError(f"{src.path}: unsupported hidden_act {vc.get('hidden_act')!r}")
    _check_arch(src, model, act, float(vc.get("layer_norm_eps", 1e-5)))
  out.take("embedding/kernel", f"{p}embeddings.patch_embedding.weight", cio.conv_oihw_to_hwio)
  if f"{p}embeddings.patch_embedding.bias" in src:
    out.take("embedding/bias", f"{p}embeddings.patch_embedding.bias")
  else:  # CLIP's patch convolution has no bias: a zero bias is the same function.
    out.put("embedding/bias", np.zeros(out.tshapes["embedding/bias"], np.float32),
            f"{p}embeddings.patch_embedding (no bias)")
  pos_key = f"{p}embeddings.position_embedding.weight"
  pos = src.take(pos_key)
  cls_key = f"{p}embeddings.class_embedding"
  if cls_key in src:  # CLIP: row 0 of the table is the class token's position
    if "cls" in out:
      out.put("cls", (src.take(cls_key) + pos[0]).reshape(1, 1, -1), cls_key)
    else:
      src.hint(cls_key, "build VideoViT with class_token=True (CLIP has a class token)")
    pos = pos[1:]
  _put_posemb(src, out, pos_key, pos, grid)
  if f"{p}pre_layrnorm.weight" in src and "pre_norm/scale" in out:
    cio.put_hf_layer_norm(out, "pre_norm", f"{p}pre_layrnorm")
  src.hint(f"{p}pre_layrnorm.weight", "build VideoViT with pre_norm=True (CLIP has a "
                                      "pre-encoder LayerNorm)")
  depth = cio.hf_num_layers(src, f"{p}encoder.layers")
  cio.check_depth(src, _depth(out.tshapes), depth, "the vision encoder")
  for i in range(depth):
    cio.put_hf_encoder_layer(out, f"Transformer/encoderblock_{i}", f"{p}encoder.layers.{i}")
  cio.put_hf_layer_norm(out, "Transformer/encoder_norm", f"{p}post_layernorm")
  for other in (f"{p}head.", "visual_projection.", "text_model.", "text_projection.",
                "logit_scale", "logit_bias"):
    src.ignore(other, _HEAD_REASON)
  src.ignore("clusterstm/", "the rest of a clusterstm_jax export (portable.py)")


def load(path: str | os.PathLike, params_template, *, model: VideoViT | None = None,
         grid: tuple[int, int] | None = None, strict: bool = True):
  """Loads a pretrained image tower into VideoViT params shaped like `params_template`.

  path: a big_vision ViT or SigLIP `.npz` (the 'img' tower of a two-tower checkpoint is
    found by itself), or a transformers CLIP / SigLIP checkpoint (`model.safetensors` or its
    directory; CLIPModel, CLIPVisionModel, SiglipModel, SiglipVisionModel).
  params_template: initialised VideoViT params (the 'params' dict or {'params': ...}; flax
    boxes are kept). Parameters an image tower cannot provide (time_embedding) keep their value.
  model: the VideoViT, to check the activation / LayerNorm eps against the checkpoint's and
    to take the patch grid for position resampling (else `grid`, else a square grid).
  strict: unused checkpoint keys are an error (True) or a warning. Keys that are unused by
    design (heads, the text tower, a sin-cos model's position table) are only logged.
  Returns the params tree (numpy arrays). Raises CheckpointError (a ValueError) naming the
  missing / unused / mis-shaped parameters, or the file when it cannot be read.
  """
  src = cio.Source(path)
  out = cio.Converted(src, cio.template_shapes(params_template))
  if grid is None and model is not None:
    grid = model.grid
  if src.format == "npz":
    _from_big_vision(src, out, grid, model)
  else:
    _from_hf(src, out, grid, model)
  fresh = {"time_embedding": "image checkpoints have no time axis; zeros keep frame 0 equal "
                             "to the image model"}
  return cio.assign(out, params_template, fresh={k: v for k, v in fresh.items()
                                                 if k in out.tshapes}, strict=strict)
