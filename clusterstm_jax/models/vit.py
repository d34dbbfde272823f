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
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusterstm_jax.models import common
from clusterstm_jax.models.common import grid_size, num_patches  # re-exported helpers

__all__ = ["VideoViT", "grid_size", "num_patches"]


class VideoViT(nn.Module):
  """__call__(video [B,T,H,W,3], keep_idx [B,T,Nc] | None, *, train) -> (tokens [B,T,Nc,D], aux).

  T must be `num_frames` or 1 (images). aux holds:
    'patches': position-embedded patch embeddings of every token, [B, T, N, D];
    'encoder_input': the gathered visible ones fed to the encoder, [B, T, Nc, D];
    'pre_ln': encoder output before the final norm, [B, T, Nc, D].
  Indices outside [0, N) are not checked under jit; the gather then yields NaNs.
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
    b, t, h, w, c = video.shape
    frames = jnp.reshape(video, (b * t, h, w, c)).astype(self.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embedding",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(frames)
    gh, gw = x.shape[1:3]
    x = jnp.reshape(x, (b, t, gh * gw, d))
    # Positions are added before dropping tokens, so each kept token knows where it was.
    x = x + jnp.asarray(common.sincos_posemb_3d(t, gh, gw, d), x.dtype)[None]
    aux = {"patches": x}

    if keep_idx is not None:
      x = jnp.take_along_axis(x, keep_idx[..., None].astype(jnp.int32), axis=2)
    aux["encoder_input"] = x
    nc = x.shape[2]

    x = jnp.reshape(x, (b, t * nc, d))  # joint space-time attention over visible tokens
    x = nn.with_logical_constraint(x, common.ACT)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, out = common.Encoder(dims["depth"], dims["mlp_dim"], dims["num_heads"], self.dropout,
                            dtype=self.dtype, name="Transformer")(x, deterministic=not train)
    x = nn.with_logical_constraint(x, common.ACT)
    aux["pre_ln"] = jnp.reshape(out["pre_ln"], (b, t, nc, d))
    return jnp.reshape(x, (b, t, nc, d)), aux
