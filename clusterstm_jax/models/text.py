"""The student's BERT-style text encoder with fusion layers (UMT: layers 0-8 text-only,
layers 9-11 also cross-attend to video tokens), plus its masked-language-modelling head.

Pre-LN transformer blocks (common.EncoderBlock). Pad id is 0 by default; padded keys are
masked out of every attention. Position 0 is a [CLS]/BOS token whose hidden state is the
sentence feature. Submodules are defined in setup() so that `encode`, `fuse` and
`mlm_logits` share parameters: a parent calls `encode` once and `fuse` as often as it likes
(VTM positives and negatives), all on the same weights. `__call__` runs every path once and
is what `init` uses when the encoder is initialised on its own.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusterstm_jax.models import common


def padding_mask(ids: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
  """[B, L] bool, True at real tokens."""
  return ids != pad_id


class TextEncoder(nn.Module):
  """BERT-style text encoder: (depth - num_fusion_layers) text-only layers, then
  num_fusion_layers layers with cross-attention to video tokens.

  Methods (through `apply(..., method=...)` or as a submodule):
    encode(ids [B,L] int, *, train) -> hidden [B,L,D]   (text-only layers + norm)
    fuse(hidden, text_mask [B,L], video_tokens [B,M,Dv], video_mask [B,M] | None, *, train)
        -> fused [B,L,D]   (video projected to D by `video_proj` when Dv != D)
    mlm_logits(hidden [B,L,D]) -> [B,L,vocab]   (dense + gelu + LN + tied/untied output)
  """
  vocab_size: int
  max_len: int
  variant: str = "Mu"
  num_layers: int | None = None  # overrides the variant's depth
  num_fusion_layers: int = 1
  width: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  dropout: float = 0.0
  tie_mlm_head: bool = True
  pad_id: int = 0
  dtype: Any = jnp.float32
  remat: str = "none"  # common.REMAT_POLICIES name for the blocks

  @property
  def dims(self) -> dict[str, Any]:
    dims = common.resolve_dims(self.variant, width=self.width, depth=self.num_layers,
                               mlp_dim=self.mlp_dim, num_heads=self.num_heads)
    if not 1 <= self.num_fusion_layers <= dims["depth"]:
      raise ValueError(f"num_fusion_layers must be in [1, depth={dims['depth']}], "
                       f"got {self.num_fusion_layers}")
    return dims

  def setup(self):
    dims = self.dims
    d = dims["width"]
    part = nn.with_logical_partitioning
    bert_init = nn.initializers.normal(stddev=0.02)
    self.token_embedding = nn.Embed(self.vocab_size, d, dtype=self.dtype,
                                    embedding_init=part(bert_init, ("vocab", "embed")))
    self.pos_embedding = self.param("pos_embedding", part(bert_init, (None, None, "embed")),
                                    (1, self.max_len, d), jnp.float32)
    blocks = dict(mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"], dropout=self.dropout,
                  dtype=self.dtype, remat=self.remat)
    self.text_encoder = common.Encoder(dims["depth"] - self.num_fusion_layers, **blocks)
    self.fusion_encoder = common.Encoder(self.num_fusion_layers, cross_attention=True, **blocks)
    self.embed_dropout = nn.Dropout(rate=self.dropout)
    # Only created (at init) when the video width differs from the text width.
    self.video_proj = nn.Dense(d, dtype=self.dtype,
                               kernel_init=part(nn.initializers.xavier_uniform(),
                                                ("embed", None)),
                               bias_init=part(nn.initializers.zeros, (None,)))
    self.mlm_dense = nn.Dense(d, dtype=self.dtype,
                              kernel_init=part(nn.initializers.xavier_uniform(), ("embed", None)),
                              bias_init=part(nn.initializers.zeros, (None,)))
    self.mlm_norm = common.layer_norm(self.dtype)
    if self.tie_mlm_head:
      self.mlm_bias = self.param("mlm_bias", part(nn.initializers.zeros, ("vocab",)),
                                 (self.vocab_size,), jnp.float32)
    else:
      self.mlm_out = nn.Dense(self.vocab_size, dtype=self.dtype,
                              kernel_init=part(bert_init, ("embed", "vocab")),
                              bias_init=part(nn.initializers.zeros, ("vocab",)))

  def encode(self, ids, *, train: bool = False):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids must be integer [B, L], got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"text length {ids.shape[1]} exceeds max_len {self.max_len}")
    length = ids.shape[1]
    x = self.token_embedding(ids) + self.pos_embedding[:, :length].astype(self.dtype)
    x = nn.with_logical_constraint(x, common.ACT)
    x = self.embed_dropout(x, deterministic=not train)
    x, _ = self.text_encoder(x, padding_mask(ids, self.pad_id), deterministic=not train)
    return x

  def fuse(self, hidden, text_mask, video_tokens, video_mask=None, *, train: bool = False):
    if video_tokens.ndim != 3 or video_tokens.shape[0] != hidden.shape[0]:
      raise ValueError(f"video_tokens must be [B={hidden.shape[0]}, M, Dv], "
                       f"got shape {video_tokens.shape}")
    if text_mask is not None and text_mask.shape != hidden.shape[:2]:
      raise ValueError(f"text_mask must be {hidden.shape[:2]}, got {text_mask.shape}")
    if video_mask is not None and video_mask.shape != video_tokens.shape[:2]:
      raise ValueError(f"video_mask must be {video_tokens.shape[:2]}, got {video_mask.shape}")
    v = video_tokens.astype(self.dtype)
    if v.shape[-1] != hidden.shape[-1]:
      v = self.video_proj(v)
    x, _ = self.fusion_encoder(hidden, text_mask, v, video_mask, deterministic=not train)
    return x

  def mlm_logits(self, hidden):
    x = self.mlm_norm(nn.gelu(self.mlm_dense(hidden)))
    if self.tie_mlm_head:
      return self.token_embedding.attend(x) + self.mlm_bias.astype(x.dtype)
    return self.mlm_out(x)

  def __call__(self, ids, video_tokens, video_mask=None, *, train: bool = False):
    """Runs encode -> fuse -> mlm_logits once (for init); returns a dict of the three."""
    hidden = self.encode(ids, train=train)
    fused = self.fuse(hidden, padding_mask(ids, self.pad_id), video_tokens, video_mask,
                      train=train)
    return dict(hidden=hidden, fused=fused, mlm_logits=self.mlm_logits(fused))
