"""The causal text decoder used as UMT's VideoQA answer decoder and as the captioning decoder,
(its loss is losses.lm_loss).

  ids [B,L] --token_embedding + pos_embedding--> [B,L,D]
  -> `depth` pre-LN DecoderBlocks: causal self-attention, cross-attention to the context
     [B,M,Dc] (projected to D by `context_proj` when Dc != D), MLP
  -> LayerNorm `decoder_norm` -> logits over the vocabulary [B,L,V] (tied to the token embedding,
     plus a bias `logits_bias`).

With `vocab_multiple` > 1 the table (and V) is rounded up to a multiple of it, as the student's
text embedding (config.model.vocab_multiple: a vocabulary that splits over an FSDP axis). The
padded rows are no token's: their logits are -inf, so no loss, score or decoder ever gives
them probability (the decoding functions never pick them).

For QA the context is the fused question+video features of the text encoder; for captioning
the video tokens. A DecoderBlock names its children as common.EncoderBlock with cross-attention
(LayerNorm_0, MultiHeadDotProductAttention_0, cross_norm, cross_attention, LayerNorm_1,
MlpBlock_0), so a fusion layer of the text encoder can initialise a decoder layer by name (as
BLIP/UMT initialise their decoders from BERT). Attention kernels come from `common.attention`
(boxed names that also work under `jax.set_mesh`).

Position t of the output predicts token t+1: self-attention is causal (a key at position > t is
never seen by query t), and padded keys (id == pad_id) are masked as well.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusterstm_jax.models import common
from clusterstm_jax.models import text as text_lib

__all__ = ["DecoderBlock", "TextDecoder", "causal_mask"]

_part = nn.with_logical_partitioning


def causal_mask(ids: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
  """bool [B, 1(heads), L(query), L(key)]: True where query q may attend key k (k <= q and
  ids[k] is not padding)."""
  length = ids.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & (ids != pad_id)[:, None, None, :]


class DecoderBlock(nn.Module):
  """Pre-LN block: causal self-attention, cross-attention to `context`, MLP; each residual.

  `self_mask` is a full attention mask [B,1,L,L] (see causal_mask); `context_mask` a key
  padding mask [B,M] or None.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, self_mask, context, context_mask=None, deterministic: bool = True):
    x = nn.with_logical_constraint(x, common.ACT)
    y = common.layer_norm(self.dtype)(x)
    y = common.attention(self.num_heads, self.dtype)(y, y, mask=self_mask)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = nn.with_logical_constraint(x + y, common.ACT)

    y = common.layer_norm(self.dtype, name="cross_norm")(x)
    y = common.attention(self.num_heads, self.dtype, name="cross_attention")(
        y, context, mask=common.key_mask(context_mask))
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = nn.with_logical_constraint(x + y, common.ACT)

    y = common.layer_norm(self.dtype)(x)
    y = common.MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x + y, common.ACT)


class TextDecoder(nn.Module):
  """__call__(ids int [B,L], context [B,M,Dc], context_mask bool [B,M] | None, *, train)
  -> logits float32 [B,L,V]; logits[:, t] is the distribution of token t+1. V is vocab_size
  rounded up to a multiple of `vocab_multiple`; the padded ids' logits are -inf.

  L <= max_len. Sizes come from `variant` (common.VARIANTS) with optional overrides.
  Children: token_embedding, pos_embedding, context_proj (only when Dc != width),
  decoderblock_{i}, decoder_norm, logits_bias.
  """
  vocab_size: int
  max_len: int
  variant: str = "Mu"
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  dropout: float = 0.0
  pad_id: int = 0
  dtype: Any = jnp.float32
  remat: str = "none"  # common.REMAT_POLICIES name for the blocks
  vocab_multiple: int = 1  # the table padded to a multiple of it (config.model.vocab_multiple)

  @property
  def dims(self) -> dict[str, Any]:
    return common.resolve_dims(self.variant, width=self.width, depth=self.depth,
                               mlp_dim=self.mlp_dim, num_heads=self.num_heads)

  def _check(self, ids, context, context_mask):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"decoder ids must be integer [B, L], got shape {ids.shape} "
                       f"dtype {ids.dtype}")
    if not 1 <= ids.shape[1] <= self.max_len:
      raise ValueError(f"decoder length {ids.shape[1]} must be in [1, max_len={self.max_len}]")
    if context.ndim != 3 or context.shape[0] != ids.shape[0]:
      raise ValueError(f"context must be [B={ids.shape[0]}, M, Dc], got shape {context.shape}")
    if context_mask is not None and context_mask.shape != context.shape[:2]:
      raise ValueError(f"context_mask must have shape {context.shape[:2]}, got "
                       f"{context_mask.shape}")

  @nn.compact
  def __call__(self, ids, context, context_mask=None, *, train: bool = False):
    self._check(ids, context, context_mask)
    dims = self.dims
    d, length = dims["width"], ids.shape[1]
    bert_init = nn.initializers.normal(stddev=0.02)
    table = text_lib.padded_vocab(self.vocab_size, self.vocab_multiple)
    embed = nn.Embed(table, d, dtype=self.dtype, name="token_embedding",
                     embedding_init=_part(bert_init, ("vocab", "embed")))
    pos = self.param("pos_embedding", _part(bert_init, (None, None, "embed")),
                     (1, self.max_len, d), jnp.float32)
    x = embed(ids) + pos[:, :length].astype(self.dtype)
    x = nn.with_logical_constraint(x, common.ACT)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    context = context.astype(self.dtype)
    if context.shape[-1] != d:
      context = nn.Dense(d, dtype=self.dtype, name="context_proj",
                         kernel_init=_part(nn.initializers.xavier_uniform(), (None, "embed")),
                         bias_init=_part(nn.initializers.zeros, ("embed",)))(context)
    self_mask = causal_mask(ids, self.pad_id)
    block = common.remat_block(DecoderBlock, self.remat)
    for i in range(dims["depth"]):
      x = block(dims["mlp_dim"], dims["num_heads"], self.dropout, self.dtype,
                name=f"decoderblock_{i}")(x, self_mask, context, context_mask, not train)
    x = common.layer_norm(self.dtype, name="decoder_norm")(x)
    bias = self.param("logits_bias", _part(nn.initializers.zeros, ("vocab",)),
                      (table,), jnp.float32)
    logits = (embed.attend(x) + bias.astype(x.dtype)).astype(jnp.float32)
    if table > self.vocab_size:  # the padded rows are no token's: never predicted
      logits = jnp.where(jnp.arange(table) < self.vocab_size, logits, -jnp.inf)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
