"""Stochastic depth (drop path) in the transformer blocks: per-sample residual branches, off
in evaluation, the same draw for the same 'dropout' rng (the step's fold_in(key, step))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax.models import common
from clusterstm_jax.models import vit

pytestmark = pytest.mark.unit


def test_drop_path_drops_whole_samples_branches():
  block = common.EncoderBlock(mlp_dim=32, num_heads=2, drop_path=0.5)
  x = jax.random.normal(jax.random.key(0), (16, 5, 16))
  params = block.init(jax.random.key(1), x)
  rngs = {'dropout': jax.random.key(2)}
  out = block.apply(params, x, deterministic=False, rngs=rngs)
  plain = common.EncoderBlock(mlp_dim=32, num_heads=2).apply(params, x)
  # Evaluation: no drop; the same function as a block without drop path.
  np.testing.assert_array_equal(block.apply(params, x), plain)
  # Training: samples whose two branches were both dropped come out unchanged, on every token.
  unchanged = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2))
  assert 0 < unchanged.sum() < len(x)
  np.testing.assert_array_equal(out, block.apply(params, x, deterministic=False, rngs=rngs))


def test_videovit_drop_path_trains_only():
  model = vit.VideoViT(variant='Pico/8', num_frames=2, image_size=16, depth=3, drop_path=0.9)
  video = jax.random.normal(jax.random.key(0), (4, 2, 16, 16, 3))
  params = model.init(jax.random.key(1), video)
  base = vit.VideoViT(variant='Pico/8', num_frames=2, image_size=16, depth=3)
  np.testing.assert_array_equal(model.apply(params, video)[0], base.apply(params, video)[0])
  trained = model.apply(params, video, train=True, rngs={'dropout': jax.random.key(3)})[0]
  assert not jnp.allclose(trained, base.apply(params, video)[0])
