"""The teacher's own training (SigLIP): every frame of a clip is an image paired with its
caption, under the pairwise sigmoid loss."""
from __future__ import annotations

import functools

import jax.numpy as jnp

from clusterstm_jax import losses
from clusterstm_jax.models import common
from clusterstm_jax.models import siglip as siglip_lib
from clusterstm_jax.tasks import base


def make_model(config, vocab_size: int) -> siglip_lib.SigLIP:
  return siglip_lib.SigLIP(variant=config.model.vision_variant,
                           text_variant=config.model.text_variant,
                           image_size=config.data.image_size, vocab_size=vocab_size,
                           text_len=config.data.max_text_len,
                           out_dim=config.model.get('embed_dim'),
                           temperature_init=config.model.get('temperature_init', 10.0),
                           bias_init=config.model.get('bias_init', -10.0), **common.policy(config))


def init_inputs(config):
  s, l = config.data.image_size, config.data.max_text_len
  return (jnp.zeros((2, s, s, 3), jnp.float32), jnp.zeros((2, l), jnp.int32))


def build(config, text: base.TextSpec) -> base.Task:
  model = make_model(config, text.vocab_size)

  def embed_frames(params, video, train, rngs=None):
    b, t = video.shape[:2]
    zimg, _ = model.apply({'params': params}, video.reshape(b * t, *video.shape[2:]),
                          train=train, rngs=rngs, method=model.encode_image)
    return zimg.reshape(b, t, -1)

  def loss_fn(params, batch, rng, teacher_params):
    del teacher_params
    rngs = {'dropout': rng}
    zimg = embed_frames(params, base.normalize_video(batch['video']), True, rngs)
    ztxt = model.apply({'params': params}, batch['text'], train=True, rngs=rngs,
                       method=model.encode_text)
    loss = losses.sigmoid_loss_frames(zimg, ztxt, params['t'], params['b'])
    return loss, dict(sigmoid=loss, log_t=params['t'][0], bias=params['b'][0])

  def embed_video(params, video):
    return losses.l2_normalize(embed_frames(params, base.normalize_video(video), False))

  def embed_text(params, ids):
    return losses.l2_normalize(model.apply({'params': params}, ids, method=model.encode_text))

  return base.Task(name='siglip', model=model, init_inputs=init_inputs(config), loss_fn=loss_fn,
                   encode_video=embed_video, encode_text=embed_text,
                   dummy_batch=functools.partial(base.video_batch, config),
                   predict_fns=dict(embed_video=embed_video, embed_text=embed_text))
