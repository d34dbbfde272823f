"""The ClusterSTM student: video ViT on visible tokens, text encoder, projections, temperature.

The video encoder only sees the tokens that masking keeps; everything downstream (pooling,
contrastive projection) works on those. Methods are used through `model.apply(..., method=...)`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clusterstm_jax.models import text as text_lib
from clusterstm_jax.models import vit as vit_lib
from clusterstm_jax.objectives import l2_normalize


def vision_tower(config: ml_collections.ConfigDict, num_frames: int, image_size: int,
                 name: str | None = None) -> vit_lib.VideoViT:
  """The student's VideoViT. `config.vision_options` (optional dict) passes the VideoViT
  options that match a pretrained tower, e.g. CLIP's: dict(posemb='learn', class_token=True,
  pre_norm=True, mlp_act='quick_gelu', ln_eps=1e-5) (see vit.py)."""
  options = config.get('vision_options') or {}
  options = options.to_dict() if hasattr(options, 'to_dict') else dict(options)
  return vit_lib.VideoViT(variant=config.vision_variant, num_frames=num_frames,
                          image_size=image_size, dropout=config.get('dropout', 0.0), name=name,
                          **options)


def load_pretrained(path: str, student_params, model: 'ClusterSTM', *, strict: bool = True):
  """Initialises the student's vision tower from a pretrained image tower (vit.load: CLIP or
  SigLIP safetensors, big_vision ViT/SigLIP .npz); every other student parameter (text tower,
  projections, temperature, and a video-only time_embedding) keeps its value.

  student_params: initialised ClusterSTM params ('params' dict or {'params': ...}).
  model: the ClusterSTM (its config gives the vision options and patch grid for the checks).
  """
  wrapped = set(student_params) == {'params'}
  params = dict(student_params['params'] if wrapped else student_params)
  if 'vision' not in params:
    raise ValueError(f"student params have no 'vision' tower; top-level keys: {sorted(params)}")
  tower = vision_tower(model.config, model.num_frames, model.image_size)
  params['vision'] = vit_lib.load(path, params['vision'], model=tower, strict=strict)
  return {'params': params} if wrapped else params


class ClusterSTM(nn.Module):
  config: ml_collections.ConfigDict  # config.model
  vocab_size: int
  num_frames: int
  image_size: int
  max_text_len: int

  def setup(self):
    c = self.config
    self.vision = vision_tower(c, self.num_frames, self.image_size, name='vision')
    self.text = text_lib.TextEncoder(vocab_size=self.vocab_size, max_len=self.max_text_len,
                                     variant=c.text_variant, num_layers=c.get('text_depth'),
                                     num_fusion_layers=c.text_fusion_layers,
                                     dropout=c.get('dropout', 0.0), name='text')
    dense = lambda name: nn.Dense(
        c.embed_dim, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                 ('embed', None)))
    self.vision_proj = dense('vision_proj')
    self.text_proj = dense('text_proj')
    self.temp = self.param('temp', nn.with_logical_partitioning(
        lambda *_: jnp.asarray(c.temp_init, jnp.float32), ()), ())

  def temperature(self):
    # UMT clamps the learnable temperature to [0.001, 0.5].
    return jnp.clip(self.temp, 0.001, 0.5)

  def encode_video(self, video, keep_idx=None, *, train=False):
    """video: [B,T,H,W,3] normalised -> (frame features [B,T,E] normalised, tokens [B,T,Nc,D])."""
    tokens, _ = self.vision(video, keep_idx, train=train)
    frame = jnp.mean(tokens, axis=2)  # mean over the (visible) tokens of each frame
    return l2_normalize(self.vision_proj(frame)), tokens

  def encode_text(self, ids, *, train=False):
    """ids: [B,L] -> (sentence feature [B,E] normalised, hidden [B,L,Dt])."""
    hidden = self.text.encode(ids, train=train)
    return l2_normalize(self.text_proj(hidden[:, 0])), hidden

  def __call__(self, video, ids, keep_idx=None, *, train=False) -> dict[str, Any]:
    video_feat, tokens = self.encode_video(video, keep_idx, train=train)
    text_feat, hidden = self.encode_text(ids, train=train)
    return dict(video_feat=video_feat, text_feat=text_feat, video_tokens=tokens,
                text_hidden=hidden, temperature=self.temperature())
