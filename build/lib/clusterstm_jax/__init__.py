"""ClusterSTM in JAX/Flax: cluster-wise spatio-temporal masking for video-language pretraining.

`clusterstm_jax.load(DIR)` returns a trained model (api.py); it is imported on first use, so
`import clusterstm_jax` stays light (no jax, no flax).
"""
__version__ = "0.1.0"
__all__ = ["load"]


def load(path, **kwargs):
  """An export or a training run -> api.Model (embed_video, embed_text, similarity, answer,
  caption). See clusterstm_jax/api.py."""
  # lazy: keeps jax/flax off `import clusterstm_jax`
  from clusterstm_jax import api
  return api.load(path, **kwargs)
