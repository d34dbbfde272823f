"""The student's BERT-style text encoder with fusion layers (UMT: layers 0-8 text-only,
layers 9-11 also cross-attend to video tokens), plus its masked-language-modelling head.

Pre-LN transformer blocks (common.EncoderBlock) by default; with `post_ln`, `embed_norm`,
`mlp_act='gelu'` and `ln_eps=1e-12` it is BERT's architecture, and `load` reads a Hugging Face
BERT checkpoint into it (UMT starts its text tower from BERT-base). Pad id is 0 by default; padded keys are
masked out of every attention. Position 0 is a [CLS]/BOS token whose hidden state is the
sentence feature. Submodules are defined in setup() so that `encode`, `fuse` and
`mlm_logits` share parameters: a parent calls `encode` once and `fuse` as often as it likes
(VTM positives and negatives), all on the same weights. `__call__` runs every path once and
is what `init` uses when the encoder is initialised on its own.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import common


def padded_vocab(vocab_size: int, multiple: int = 1) -> int:
  """`vocab_size` rounded up to a multiple of `multiple` (config.model.vocab_multiple): the row
  count of an embedding table that splits over an FSDP axis (BERT's 30522 ids do not)."""
  if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
    raise ValueError(f"vocab_multiple={multiple!r} must be an int >= 1")
  return -(-vocab_size // multiple) * multiple


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
  # BERT's architecture (all four for a BERT checkpoint): post-LN blocks without final norms,
  # a LayerNorm on the embeddings, exact GELU (MLP and MLM head) and LayerNorm eps 1e-12.
  post_ln: bool = False
  embed_norm: bool = False
  mlp_act: str = "gelu_tanh"
  ln_eps: float = 1e-6

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
                  dtype=self.dtype, remat=self.remat, act=self.mlp_act, ln_eps=self.ln_eps,
                  post_ln=self.post_ln)
    if self.embed_norm:
      self.embedding_norm = common.layer_norm(self.dtype, eps=self.ln_eps)
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
    self.mlm_norm = common.layer_norm(self.dtype, eps=self.ln_eps)
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
    if self.embed_norm:
      x = self.embedding_norm(x)
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
    x = self.mlm_norm(common.activation(self.mlp_act)(self.mlm_dense(hidden)))
    if self.tie_mlm_head:
      return self.token_embedding.attend(x) + self.mlm_bias.astype(x.dtype)
    return self.mlm_out(x)

  def __call__(self, ids, video_tokens, video_mask=None, *, train: bool = False):
    """Runs encode -> fuse -> mlm_logits once (for init); returns a dict of the three."""
    hidden = self.encode(ids, train=train)
    fused = self.fuse(hidden, padding_mask(ids, self.pad_id), video_tokens, video_mask,
                      train=train)
    return dict(hidden=hidden, fused=fused, mlm_logits=self.mlm_logits(fused))


# ----------------------------------------------------------------------------- pretrained
BERT_OPTIONS = dict(post_ln=True, embed_norm=True, mlp_act="gelu", ln_eps=1e-12)
_BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _put_ln(out: cio.Converted, ours: str, hf: str) -> None:
  """A BERT LayerNorm: `weight`/`bias`, or `gamma`/`beta` in checkpoints saved before the rename."""
  scale, bias = ("weight", "bias") if f"{hf}.weight" in out.source else ("gamma", "beta")
  out.take(f"{ours}/scale", f"{hf}.{scale}")
  out.take(f"{ours}/bias", f"{hf}.{bias}")


def _check_bert_arch(src: cio.Source, model: TextEncoder | None) -> None:
  cfg = src.hf_config or {}
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise cio.CheckpointError(f"{src.path}: position_embedding_type="
                              f"{cfg['position_embedding_type']!r}; only 'absolute' is supported")
  if model is None:
    return
  act = _BERT_ACTS.get(cfg.get("hidden_act", "gelu"))
  eps = float(cfg.get("layer_norm_eps", 1e-12))
  if not (model.post_ln and model.embed_norm) or model.mlp_act != act or not np.isclose(
      model.ln_eps, eps, rtol=1e-6, atol=0):
    raise cio.CheckpointError(
        f"{src.path} is a BERT (post-LN, embedding LayerNorm, hidden_act "
        f"{cfg.get('hidden_act', 'gelu')!r}, LayerNorm eps {eps}), but the text tower has "
        f"post_ln={model.post_ln}, embed_norm={model.embed_norm}, mlp_act={model.mlp_act!r}, "
        f"ln_eps={model.ln_eps}: build it with text_options={BERT_OPTIONS}")


def load(path: str | os.PathLike, params_template, *, model: TextEncoder | None = None,
         strict: bool = True):
  """Loads a Hugging Face BERT checkpoint (BertModel, BertForMaskedLM or BertForPreTraining
  safetensors: a model directory with config.json, or its model.safetensors) into TextEncoder
  params shaped like `params_template` (initialised params; the 'params' dict or {'params': ...}).

  BERT layer i fills text_encoder/encoderblock_i, and the last num_fusion_layers layers the
  fusion blocks, whose cross-attention (and its norm) keeps its initial value, as in UMT/ALBEF.
  The token-type embedding of type 0 (the only type used) is folded into the position table,
  which keeps its first max_len rows. The MLM head (cls.predictions) is loaded when present,
  else kept. Not used, by design: the pooler, next-sentence head, other token types.
  model: the TextEncoder, to check its architecture options against the checkpoint's config.
  """
  src = cio.Source(path)
  if src.format != "safetensors":
    raise cio.CheckpointError(f"{src.path}: BERT weights are read from Hugging Face safetensors")
  prefix = next((p for p in ("bert.", "") if f"{p}embeddings.word_embeddings.weight" in src),
                None)
  if prefix is None:
    raise cio.CheckpointError(f"{src.path} is not a transformers BERT checkpoint: no key "
                              f"'[bert.]embeddings.word_embeddings.weight'")
  _check_bert_arch(src, model)
  out = cio.Converted(src, cio.template_shapes(params_template))
  template = cio.flatten(nn.unbox(cio._params_of(params_template)))  # pylint: disable=protected-access
  e = f"{prefix}embeddings"
  words = src.take(f"{e}.word_embeddings.weight")

  def rows(name, array, origin):
    """A vocabulary-sized array, the template's rows past the checkpoint's vocabulary kept (a
    table padded to a multiple of the FSDP axis: those ids never occur)."""
    want = out.tshapes[name]
    if want[0] > len(array) and not isinstance(template[name], jax.ShapeDtypeStruct):
      array = np.concatenate([array, np.asarray(template[name])[len(array):]], axis=0)
    out.put(name, array, origin)

  rows("token_embedding/embedding", words, f"{e}.word_embeddings.weight")
  max_len = out.tshapes["pos_embedding"][1]
  table = src.take(f"{e}.position_embeddings.weight")
  if len(table) < max_len:
    raise cio.CheckpointError(f"{src.path} has {len(table)} positions; the text tower needs "
                              f"max_len={max_len}")
  types = f"{e}.token_type_embeddings.weight"
  folded = table[:max_len] + (src.take(types)[0] if types in src else 0.0)
  out.put("pos_embedding", folded[None], f"{e}.position_embeddings.weight (+ token type 0)")
  if "embedding_norm/scale" in out:
    _put_ln(out, "embedding_norm", f"{e}.LayerNorm")

  blocks = lambda enc: sorted({k.split("/")[1] for k in out.tshapes if k.startswith(enc + "/")
                               and k.split("/")[1].startswith("encoderblock_")},
                              key=lambda b: int(b.split("_")[1]))
  ours = [f"text_encoder/{b}" for b in blocks("text_encoder")]
  ours += [f"fusion_encoder/{b}" for b in blocks("fusion_encoder")]
  depth = cio.hf_num_layers(src, f"{prefix}encoder.layer")
  cio.check_depth(src, len(ours), depth, "the text tower (text + fusion layers)")
  for i, block in enumerate(ours):
    hf = f"{prefix}encoder.layer.{i}"
    wb = lambda p: (src.take(f"{hf}.{p}.weight"), src.take(f"{hf}.{p}.bias"))
    cio.put_attention(out, f"{block}/MultiHeadDotProductAttention_0",
                      wb("attention.self.query"), wb("attention.self.key"),
                      wb("attention.self.value"), wb("attention.output.dense"),
                      f"{hf}.attention")
    _put_ln(out, f"{block}/LayerNorm_0", f"{hf}.attention.output.LayerNorm")
    cio.put_hf_linear(out, f"{block}/MlpBlock_0/Dense_0", f"{hf}.intermediate.dense")
    cio.put_hf_linear(out, f"{block}/MlpBlock_0/Dense_1", f"{hf}.output.dense")
    _put_ln(out, f"{block}/LayerNorm_1", f"{hf}.output.LayerNorm")

  fresh = {k: "not in BERT: UMT's fusion layers learn their cross-attention"
           for k in out.tshapes if "/cross_" in k}
  fresh.update({k: "video tokens projected to the text width: not in BERT"
                for k in out.tshapes if k.startswith("video_proj/")})
  head = "cls.predictions"
  if f"{head}.transform.dense.weight" in src:
    cio.put_hf_linear(out, "mlm_dense", f"{head}.transform.dense")
    _put_ln(out, "mlm_norm", f"{head}.transform.LayerNorm")
    if "mlm_bias" not in out:
      raise cio.CheckpointError(f"{src.path}: BERT's MLM decoder is tied to the word "
                                f"embeddings; build the text tower with tie_mlm_head=True")
    bias = f"{head}.bias" if f"{head}.bias" in src else f"{head}.decoder.bias"
    rows("mlm_bias", src.take(bias), bias)
    src.ignore(f"{head}.", "the decoder is tied to the word embeddings; the same bias")
  else:
    fresh.update({k: "the checkpoint has no MLM head (a BertModel)" for k in out.tshapes
                  if k.startswith("mlm_")})
  src.ignore(f"{prefix}pooler.", "BERT's pooler: the sentence feature is the [CLS] token's")
  src.ignore("cls.seq_relationship.", "next-sentence head")
  src.ignore(f"{e}.position_ids", "a buffer")
  src.ignore(types, "token type 0 is folded into the position table")
  return cio.assign(out, params_template, fresh=fresh, strict=strict)
