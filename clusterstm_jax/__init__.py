"""ClusterSTM in JAX/Flax: cluster-wise spatio-temporal masking for video-language pretraining."""
__version__ = "0.1.0"
