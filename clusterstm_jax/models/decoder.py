"""The student's MAE-style spatio-temporal decoder (docs/method.md, step 5): it rebuilds the full
token grid of a clip from the encoder outputs of the visible tokens.

  visible tokens [B,T,Nc,D_enc] --decoder_embed--> [B,T,Nc,W]
  -> put back at their places (keep_idx) in a [B,T,N,W] grid, the learned `mask_token` elsewhere
  -> + fixed sin-cos space-time positions at every place (sincos_posemb_3d, as the encoder)
  -> `depth` pre-LN blocks with joint space-time attention over all T*N tokens, final LayerNorm
     (common.Encoder, 'Transformer/encoderblock_{i}', 'Transformer/encoder_norm')
  -> linear `head` to out_dim.

The "scatter" is written as a gather (`scatter_tokens`): every grid place looks up which slot
of keep_idx (if any) holds it, through a [.., Nc, N] compare, then `take_along_axis`. It is
exact (no matmul precision on one-hot values), has static shapes and no scatter in the forward
pass, like the encoder's own gather. It relies on the masking invariant that the Nc indices of a
frame are distinct and in [0, N); an index outside [0, N) is silently dropped (its place stays a
mask token), a repeated index keeps its first slot.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clusterstm_jax.models import common

__all__ = ["VideoDecoder", "scatter_tokens"]

_part = nn.with_logical_partitioning


def scatter_tokens(visible, keep_idx, num_tokens: int):
  """Puts the visible tokens back at their places in the full per-frame grid.

  visible [B,T,Nc,W], keep_idx int [B,T,Nc] (distinct per frame, in [0, num_tokens))
  -> (grid [B,T,N,W] with grid[b,t,keep_idx[b,t,j]] = visible[b,t,j] and zeros elsewhere,
      kept bool [B,T,N], True at the places that received a visible token).
  """
  if visible.ndim != 4 or keep_idx.shape != visible.shape[:3]:
    raise ValueError(f"scatter_tokens needs visible [B,T,Nc,W] and keep_idx [B,T,Nc], got "
                     f"shapes {visible.shape} and {keep_idx.shape}")
  hit = keep_idx[..., :, None] == jnp.arange(num_tokens)  # [B,T,Nc,N]
  kept = jnp.any(hit, axis=-2)  # [B,T,N]
  slot = jnp.argmax(hit, axis=-2)  # first slot holding each place (0 where none)
  grid = jnp.take_along_axis(visible, slot[..., None], axis=2)
  return jnp.where(kept[..., None], grid, jnp.zeros((), grid.dtype)), kept


class VideoDecoder(nn.Module):
  """__call__(visible_tokens [B,T,Nc,D_enc], keep_idx int [B,T,Nc], grid (T, h, w), *, train)
  -> decoded [B,T,N,out_dim], N = h*w.

  `grid` holds static Python ints; its T must equal the input's T (T = 1 for images: the
  position table is then a video's first frame, as in the encoder). width % 16 == 0 (the 3-D
  sin-cos table) and width % num_heads == 0. depth = 0 is allowed (projection, positions,
  final norm and head only).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"  # common.REMAT_POLICIES name for the blocks

  def _check(self, visible_tokens, keep_idx, grid):
    if self.width % 16:
      raise ValueError(f"decoder width must be a multiple of 16 (sin-cos table), got "
                       f"{self.width}")
    if self.width % self.num_heads:
      raise ValueError(f"decoder width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.depth < 0:
      raise ValueError(f"decoder depth must be >= 0, got {self.depth}")
    if (not isinstance(grid, Sequence) or len(grid) != 3
        or not all(isinstance(g, int) and g > 0 for g in grid)):
      raise ValueError(f"grid must be a tuple of three positive ints (T, h, w), got {grid!r}")
    if visible_tokens.ndim != 4:
      raise ValueError(f"visible_tokens must be [B, T, Nc, D], got shape "
                       f"{visible_tokens.shape}")
    b, t, nc, _ = visible_tokens.shape
    if keep_idx.shape != (b, t, nc):
      raise ValueError(f"keep_idx must be [B={b}, T={t}, Nc={nc}], got shape {keep_idx.shape}")
    if not jnp.issubdtype(keep_idx.dtype, jnp.integer):
      raise ValueError(f"keep_idx must be integer, got dtype {keep_idx.dtype}")
    if grid[0] != t:
      raise ValueError(f"grid has T={grid[0]} but visible_tokens has T={t}")
    if nc > grid[1] * grid[2]:
      raise ValueError(f"{nc} visible tokens per frame but the grid {grid[1]}x{grid[2]} has "
                       f"only {grid[1] * grid[2]} places")

  @nn.compact
  def __call__(self, visible_tokens, keep_idx, grid, *, train: bool = False):
    grid = tuple(grid)
    self._check(visible_tokens, keep_idx, grid)
    b, t, _, _ = visible_tokens.shape
    _, h, w = grid
    n, d = h * w, self.width
    xavier = nn.initializers.xavier_uniform()
    x = nn.Dense(d, dtype=self.dtype, name="decoder_embed",
                 kernel_init=_part(xavier, ("embed", None)),
                 bias_init=_part(nn.initializers.zeros, (None,)))(visible_tokens)
    x, kept = scatter_tokens(x, keep_idx.astype(jnp.int32), n)
    # MAE initialises its mask token with std 0.02.
    mask_token = self.param("mask_token", _part(nn.initializers.normal(stddev=0.02),
                                                (None, None, None, "embed")),
                            (1, 1, 1, d), jnp.float32)
    x = jnp.where(kept[..., None], x, mask_token.astype(x.dtype))
    # Positions at every place: mask tokens only differ by where they are.
    x = x + jnp.asarray(common.sincos_posemb_3d(t, h, w, d), x.dtype)[None]
    x = nn.with_logical_constraint(jnp.reshape(x, (b, t * n, d)), common.ACT)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, _ = common.Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout,
                          dtype=self.dtype, remat=self.remat, name="Transformer")(x, deterministic=not train)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="head",
                 kernel_init=_part(xavier, ("embed", None)),
                 bias_init=_part(nn.initializers.zeros, (None,)))(x)
    return jnp.reshape(x, (b, t, n, self.out_dim))
