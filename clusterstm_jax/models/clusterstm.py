"""The ClusterSTM student: video ViT on visible tokens, text encoder with fusion layers,
contrastive projections and temperature, a matching (VTM) head, and the MAE-style decoder that
rebuilds every token in the teacher's width for masked relevance modelling (MRM).

The video encoder only sees the tokens that masking keeps; everything downstream (pooling,
contrastive projection, fusion, decoding) works on those. Methods are used through
`model.apply(..., method=...)`; `__call__` touches every submodule (used for init).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clusterstm_jax.models import decoder as decoder_lib
from clusterstm_jax.models import text as text_lib
from clusterstm_jax.models import vit as vit_lib
from clusterstm_jax.losses import l2_normalize


def vision_tower(config: ml_collections.ConfigDict, num_frames: int, image_size: int,
                 name: str | None = None, **policy) -> vit_lib.VideoViT:
  """The student's VideoViT. `config.vision_options` (optional dict) passes the VideoViT
  options that match a pretrained tower, e.g. CLIP's: dict(posemb='learn', class_token=True,
  pre_norm=True, mlp_act='quick_gelu', ln_eps=1e-5) (see vit.py)."""
  return vit_lib.VideoViT(variant=config.vision_variant, num_frames=num_frames,
                          image_size=image_size, dropout=config.get('dropout', 0.0), name=name,
                          drop_path=config.get('drop_path', 0.0), **policy,
                          **_options(config, 'vision_options'))


def _options(config, key: str) -> dict:
  options = config.get(key) or {}
  return options.to_dict() if hasattr(options, 'to_dict') else dict(options)


def text_tower(config: ml_collections.ConfigDict, vocab_size: int, max_text_len: int,
               name: str | None = None, **policy) -> text_lib.TextEncoder:
  """The student's TextEncoder. `config.text_options` (optional dict) passes the TextEncoder
  options of a pretrained tower: BERT's are text.BERT_OPTIONS (post-LN, embedding norm, exact
  GELU, LayerNorm eps 1e-12). `config.vocab_multiple` rounds the embedding table up to a
  multiple of it: a vocabulary such as BERT's 30522 does not split over an FSDP axis; the extra
  rows are never input ids (MLM's random replacements stay in the tokenizer's vocabulary)."""
  vocab_size = text_lib.padded_vocab(vocab_size, config.get('vocab_multiple', 1))
  return text_lib.TextEncoder(vocab_size=vocab_size, max_len=max_text_len,
                              variant=config.text_variant, num_layers=config.get('text_depth'),
                              num_fusion_layers=config.text_fusion_layers,
                              dropout=config.get('dropout', 0.0), name=name, **policy,
                              **_options(config, 'text_options'))


def load_pretrained(path: str, student_params, model: 'ClusterSTM', *, strict: bool = True):
  """Initialises the student's vision tower from a pretrained image tower (vit.load: CLIP or
  SigLIP safetensors, big_vision ViT/SigLIP .npz); every other student parameter (text tower,
  projections, temperature, decoder, and a video-only time_embedding) keeps its value.

  student_params: initialised ClusterSTM params ('params' dict or {'params': ...}; flax boxes
    are kept). model: the ClusterSTM (its config gives the vision options and the patch grid).
  """
  tower = vision_tower(model.config, model.num_frames, model.image_size)
  return _load_tower(student_params, 'vision',
                     lambda p: vit_lib.load(path, p, model=tower, strict=strict))


def load_text_pretrained(path: str, student_params, model: 'ClusterSTM', *, strict: bool = True):
  """Initialises the student's text tower (with its fusion layers' self-attention and MLPs and
  its MLM head) from a Hugging Face BERT checkpoint (text.load); every other student parameter
  keeps its value. Arguments as load_pretrained's."""
  tower = text_tower(model.config, model.vocab_size, model.max_text_len)
  return _load_tower(student_params, 'text',
                     lambda p: text_lib.load(path, p, model=tower, strict=strict))


def _load_tower(student_params, name: str, load):
  """student_params with tower `name` replaced by load(its params); the rest kept as is."""
  wrapped = set(student_params) == {'params'}
  params = dict(student_params['params'] if wrapped else student_params)
  if name not in params:
    raise ValueError(f"student params have no {name!r} tower; top-level keys: {sorted(params)}")
  params[name] = load(params[name])
  return {'params': params} if wrapped else params


TEMP_RANGE = (0.001, 0.5)  # UMT's range of the learnable VTC temperature


def clamp_temperature(params):
  """The student's params with `temp` projected into TEMP_RANGE, after every optimizer update.

  UMT clamps the parameter in place (`self.temp.clamp_(0.001, 0.5)` under no_grad) before each
  forward; a projection after the update is the same: the stored value never leaves the range,
  so the forward's clip is the identity and the gradient always reaches `temp`. (A clip in the
  forward alone lets the raw parameter drift outside, where its gradient is 0 and it sticks.)
  """
  wrapped = set(params) == {'params'}
  inner = dict(params['params'] if wrapped else params)
  inner['temp'] = jnp.clip(inner['temp'], *TEMP_RANGE)
  return {'params': inner} if wrapped else inner


class ClusterSTM(nn.Module):
  config: ml_collections.ConfigDict  # config.model
  vocab_size: int
  num_frames: int
  image_size: int
  max_text_len: int
  # The memory policy (models/common.py): activation/matmul dtype and the blocks' remat. Every
  # method returns float32 features, logits and decoded tokens (what the losses see).
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    c = self.config
    dropout = c.get('dropout', 0.0)
    policy = dict(dtype=self.dtype, remat=self.remat)
    self.vision = vision_tower(c, self.num_frames, self.image_size, name='vision', **policy)
    self.text = text_tower(c, self.vocab_size, self.max_text_len, name='text', **policy)
    dense = lambda features, name: nn.Dense(
        features, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                 ('embed', None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
    self.vision_proj = dense(c.embed_dim, 'vision_proj')
    self.text_proj = dense(c.embed_dim, 'text_proj')
    self.vtm_head = dense(2, 'vtm_head')
    self.temp = self.param('temp', nn.with_logical_partitioning(
        lambda *_: jnp.asarray(c.temp_init, jnp.float32), ()), ())
    d = c.decoder
    self.decoder = (decoder_lib.VideoDecoder(width=d.width, depth=d.depth, num_heads=d.num_heads,
                                             mlp_dim=d.mlp_dim, out_dim=d.out_dim,
                                             dropout=dropout, name='decoder', **policy)
                    if d.out_dim else None)

  def temperature(self):
    # The parameter is kept in TEMP_RANGE by clamp_temperature after each update; the clip only
    # matters for a value set from outside (an init outside the range).
    return jnp.clip(self.temp, *TEMP_RANGE)

  def encode_video(self, video, keep_idx=None, *, train=False):
    """video: [B,T,H,W,3] normalised -> (frame features [B,T,E] normalised, tokens [B,T,Nc,D])."""
    tokens, _ = self.vision(video, keep_idx, train=train)
    # mean over the (visible) tokens of each frame, in f32
    frame = jnp.mean(tokens.astype(jnp.float32), axis=2)
    return l2_normalize(self.vision_proj(frame)), tokens

  def encode_text(self, ids, *, train=False):
    """ids: [B,L] -> (sentence feature [B,E] normalised, hidden [B,L,Dt])."""
    hidden = self.text.encode(ids, train=train)
    return l2_normalize(self.text_proj(hidden[:, 0].astype(jnp.float32))), hidden

  def fuse(self, hidden, ids, video_tokens, *, train=False):
    """Text hidden [B,L,D] cross-attending to video tokens [B,T,Nc,Dv] -> fused [B,L,D]."""
    b = video_tokens.shape[0]
    flat = video_tokens.reshape(b, -1, video_tokens.shape[-1])
    return self.text.fuse(hidden, text_lib.padding_mask(ids), flat, None, train=train)

  def vtm_logits(self, fused):
    return self.vtm_head(fused[:, 0].astype(jnp.float32))

  def mlm_logits(self, fused):
    return self.text.mlm_logits(fused).astype(jnp.float32)

  def decode(self, tokens, keep_idx, grid, *, train=False):
    """Visible tokens [B,T,Nc,D] at keep_idx -> every token [B,T,N,Dt] in the teacher's width."""
    return self.decoder(tokens, keep_idx, grid, train=train).astype(jnp.float32)

  def __call__(self, video, ids, keep_idx=None, *, train=False) -> dict[str, Any]:
    video_feat, tokens = self.encode_video(video, keep_idx, train=train)
    text_feat, hidden = self.encode_text(ids, train=train)
    fused = self.fuse(hidden, ids, tokens, train=train)
    out = dict(video_feat=video_feat, text_feat=text_feat, video_tokens=tokens,
               text_hidden=hidden, temperature=self.temperature(),
               vtm_logits=self.vtm_logits(fused), mlm_logits=self.mlm_logits(fused))
    if self.decoder is not None:
      b, t = video.shape[:2]
      n = self.vision.num_patches
      idx = keep_idx if keep_idx is not None else jnp.broadcast_to(jnp.arange(n), (b, t, n))
      out['decoded'] = self.decode(tokens, idx, (t, *self.vision.grid), train=train)
    return out
