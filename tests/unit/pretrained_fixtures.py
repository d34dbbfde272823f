"""Shared by tests/unit/test_pretrained_*.py: one tiny model config for both checkpoint formats
(big_vision .npz, transformers safetensors), and params templates to load them into."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import siglip

KEY = jax.random.key(0)
# 'Mu' = width 64, depth 2, mlp 256, 2 heads.
D, DEPTH, MLP, HEADS, P, IMG, VOCAB, LEN = 64, 2, 256, 2, 8, 24, 99, 8
N = (IMG // P) ** 2


def flat_params(params):
  return cio.flatten(params["params"] if set(params) == {"params"} else params)


def filled(model, *args, value=7.0):
  """A params template with every value set to `value`: the shapes of model.init without its
  (slow, op-by-op) run. Parameters a loader keeps 'fresh' must come back holding `value`."""
  return jax.tree.map(lambda s: np.full(s.shape, value, s.dtype),
                      jax.eval_shape(model.init, KEY, *args))


def siglip_teacher(image_size=IMG):
  """(model, abstract params) of the Mu SigLIP teacher both formats are written for."""
  model = siglip.SigLIP("Mu/8", image_size=image_size, vocab_size=VOCAB, text_len=LEN)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, image_size, image_size, 3)),
                          jnp.zeros((1, LEN), jnp.int32))
  return model, nn.unbox(shapes)
