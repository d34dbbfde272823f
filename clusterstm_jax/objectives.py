"""Loss functions: pure functions of model outputs (no params, no rng unless passed in).

Under jit the batch is the *global* batch (GSPMD inserts the collectives), so contrastive losses
see every in-batch negative across devices and hosts, as UMT's all-gather does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def video_text_similarity(video_feat, text_feat):
  """Per-frame similarities averaged over frames (UMT).

  video_feat: [Bv, T, E] L2-normalised per frame; text_feat: [Bt, E] L2-normalised.
  Returns [Bv, Bt] mean over frames of the cosine similarity.
  """
  return jnp.einsum('vte,se->vs', video_feat, text_feat) / video_feat.shape[1]


def vtc_loss(sim_v2t, temperature):
  """Symmetric InfoNCE on a [B, B] video-text similarity matrix with pairs on the diagonal."""
  logits = sim_v2t / temperature
  labels = jnp.arange(logits.shape[0])
  lv = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
  lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0)
  return 0.5 * (jnp.mean(lv) + jnp.mean(lt))


def sigmoid_loss_frames(zimg, ztxt, log_t, b):
  """SigLIP's pairwise sigmoid loss with every frame of a clip as a positive of its caption.

  zimg: [B, T, D] frame embeddings, ztxt: [B, D]; both L2-normalised here. A frame of clip i is a
  positive for caption i and a negative for every other caption. Summed over captions, averaged
  over frames (SigLIP's normalisation with B*T images).
  """
  bsz, t, _ = zimg.shape
  zi = l2_normalize(zimg.reshape(bsz * t, -1))
  zt = l2_normalize(ztxt)
  logits = zi @ zt.T * jnp.exp(jnp.reshape(log_t, ())) + jnp.reshape(b, ())
  labels = 2.0 * jnp.repeat(jnp.eye(bsz), t, axis=0) - 1.0
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))
