"""The masking interface: which N_c tokens of every frame the student sees.

One entry point, ``compute_mask(strategy, rng, shape=(B, T, N), num_keep=N_c, features=...)``,
for four strategies (docs/method.md step 4, and the ablations):
  'random'                  N_c tokens per frame, independently per frame, uniformly from rng;
  'tube'                    one random spatial keep set per clip, the same in every frame;
  'clusterstm'              DPC clusters per frame on the teacher features (N_c clusters), and in
                            every cluster the token of highest temporal density is kept
                            (T == 1: highest DPC local density); deterministic, rng unused;
  'clusterstm_random_pick'  the same clusters, a uniformly random token per cluster from rng.

INVARIANT: every frame keeps exactly N_c distinct tokens. Random strategies take the top N_c of
distinct-index noise; cluster strategies keep one token per cluster, the N_c clusters are
disjoint and none is empty (each centre belongs to its own cluster).

Everything is pure jnp with static shapes and no Python loop over batch, frames or clusters.
The per-cluster argmax is a masked max over a one-hot [N, N_c] membership (N <= 196, N_c <= N:
a few thousand compares per frame). Measured on this 2-core CPU at the paper's shape (B=8, T=4,
N=196, N_c=29): 0.3 ms against 0.07 ms for segment_max + segment_min, both under 0.5% of the
masking (the similarity GEMM dominates); the one-hot form is kept because it has no scatter
(scatters serialise on TPU) and applies the tie rule in a single argmax.
Ties inside a cluster go to the lowest token index (jnp.argmax returns the first maximum).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from clusterstm_jax import losses
from clusterstm_jax.masking import density as density_lib
from clusterstm_jax.masking import dpc as dpc_lib

STRATEGIES = ('random', 'tube', 'clusterstm', 'clusterstm_random_pick')
CLUSTER_STRATEGIES = ('clusterstm', 'clusterstm_random_pick')
# DPC on L2-normalised teacher tokens: the same cosine geometry as the temporal density, and
# rho = exp(-d^2) stays in [e^-4, 1], so rho * delta balances density and separation instead of
# being dominated by density for wide raw features (dpc.dpc_knn alone defaults to raw features).
DEFAULT_NORMALIZE = True


class MaskOutput(NamedTuple):
  keep_idx: jax.Array   # int32 [B, T, N_c] kept (visible) token indices, ascending per frame
  keep_mask: jax.Array  # bool [B, T, N], True = kept (visible)
  clusters: jax.Array   # int32 [B, T, N] cluster id in [0, N_c); -1 for random and tube


def num_keep(num_tokens: int, ratio: float) -> int:
  """N_c = round(N * (1 - ratio)) (halves round up), clamped to [1, N]."""
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f'num_tokens must be a positive int, got {num_tokens!r}')
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
    raise ValueError(f'masking ratio must be a number in [0, 1), got {ratio!r}')
  return min(max(math.floor(num_tokens * (1.0 - ratio) + 0.5), 1), num_tokens)


def _masked_argmax_per_cluster(clusters: jax.Array, score: jax.Array, nc: int) -> jax.Array:
  """For clusters int32 [..., N] in [0, nc) (none empty) and score [..., N]: the index of the
  highest-scoring token of every cluster, [..., nc]; ties -> lowest index."""
  member = clusters[..., :, None] == jnp.arange(nc)  # [..., N, nc]
  # -inf scores (e.g. zero density) become the lowest finite value, so a member always beats
  # the -inf given to non-members and the pick stays inside its cluster.
  score = jnp.maximum(score.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  masked = jnp.where(member, score[..., :, None], -jnp.inf)
  return jnp.argmax(masked, axis=-2).astype(jnp.int32)


def _output(keep_idx: jax.Array, n: int, clusters: jax.Array) -> MaskOutput:
  keep_idx = jnp.sort(keep_idx, axis=-1).astype(jnp.int32)
  keep_mask = jnp.any(keep_idx[..., :, None] == jnp.arange(n), axis=-2)
  return MaskOutput(keep_idx=keep_idx, keep_mask=keep_mask, clusters=clusters.astype(jnp.int32))


def _check_args(strategy, rng, shape, nc, features, dpc_k, d_c):
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown masking strategy {strategy!r}; expected one of {STRATEGIES}')
  if (not isinstance(shape, tuple) or len(shape) != 3
      or not all(isinstance(s, int) and s >= 1 for s in shape)):
    raise ValueError(f'mask shape must be a tuple of 3 positive ints (B, T, N), got {shape!r}')
  n = shape[2]
  if isinstance(nc, bool) or not isinstance(nc, int) or not 1 <= nc <= n:
    raise ValueError(f'num_keep must be an int in [1, N] = [1, {n}], got {nc!r}')
  if strategy != 'clusterstm' and rng is None:
    raise ValueError(f'masking strategy {strategy!r} needs an rng key, got None')
  if strategy in CLUSTER_STRATEGIES:
    if features is None:
      raise ValueError(f'masking strategy {strategy!r} needs teacher features, got None')
    if features.ndim != 4 or tuple(features.shape[:3]) != shape:
      raise ValueError(f'masking strategy {strategy!r}: features must be [B, T, N, D] with '
                       f'(B, T, N) = {shape}, got shape {features.shape}')
    dpc_lib.check_dpc_args(n, nc, dpc_k)
    density_lib.check_d_c(d_c)


def compute_mask(strategy: str, rng, *, shape: tuple, num_keep: int, features=None,
                 dpc_k: int = 5, d_c: float = density_lib.DEFAULT_D_C,
                 normalize: bool = DEFAULT_NORMALIZE) -> MaskOutput:
  """Which num_keep tokens of every frame stay visible.

  Args:
    strategy: one of STRATEGIES (static).
    rng: a jax PRNG key; unused (may be None) for 'clusterstm'.
    shape: (B, T, N) static.
    num_keep: N_c, static, in [1, N]; see ``num_keep()``.
    features: teacher tokens [B, T, N, D] for the cluster strategies (no gradient flows).
    dpc_k: neighbours for the DPC local density.
    d_c: temporal-density bandwidth on cosine distances.
    normalize: run DPC on L2-normalised features (else Euclidean on the raw features).
  Returns:
    MaskOutput(keep_idx [B,T,N_c] ascending, keep_mask [B,T,N], clusters [B,T,N]).
  """
  _check_args(strategy, rng, shape, num_keep, features, dpc_k, d_c)
  b, t, n = shape
  nc = num_keep

  if strategy == 'random':
    _, idx = jax.lax.top_k(jax.random.uniform(rng, (b, t, n)), nc)  # distinct indices
    return _output(idx, n, jnp.full(shape, -1))
  if strategy == 'tube':
    _, idx = jax.lax.top_k(jax.random.uniform(rng, (b, 1, n)), nc)
    return _output(jnp.broadcast_to(idx, (b, t, nc)), n, jnp.full(shape, -1))

  features = jax.lax.stop_gradient(features)
  need_temporal = strategy == 'clusterstm' and t > 1
  if need_temporal:
    # One GEMM pass serves both: per-frame distances of the normalised features come with it.
    log_rho_tem, d2_normalized = density_lib.temporal_log_density_and_sq_dists(features, d_c)
  if not normalize:
    d2 = dpc_lib.pairwise_sq_dists(features)
  elif need_temporal:
    d2 = d2_normalized
  else:
    d2 = dpc_lib.pairwise_sq_dists(losses.l2_normalize(features))
  dpc = dpc_lib.dpc_knn_from_sq_dists(d2, nc, dpc_k)

  if strategy == 'clusterstm_random_pick':
    # argmax of i.i.d. uniform noise over a cluster's members is a uniform member.
    score = jax.random.uniform(rng, (b, t, n))
  elif need_temporal:
    score = log_rho_tem
  else:  # an image (T == 1): no other frame, fall back to DPC local density
    score = dpc.log_rho
  keep = _masked_argmax_per_cluster(dpc.cluster_assign, score, nc)
  return _output(keep, n, dpc.cluster_assign)


def from_keep_idx(keep_idx: jax.Array, n: int) -> MaskOutput:
  """The MaskOutput of given kept indices [B,T,N_c] (an offline teacher cache's); clusters -1."""
  return _output(keep_idx, n, jnp.full((*keep_idx.shape[:-1], n), -1))


def default_mask_config() -> ml_collections.ConfigDict:
  """The config block `config.mask` that ``mask_from_config`` reads."""
  return ml_collections.ConfigDict(dict(
      strategy='clusterstm',            # one of STRATEGIES
      ratio=0.85,                       # masked fraction; N_c = round(N * (1 - ratio))
      dpc_k=5,                          # DPC-KNN neighbours
      d_c=density_lib.DEFAULT_D_C,      # temporal-density bandwidth (cosine distance)
      normalize=DEFAULT_NORMALIZE,      # DPC on L2-normalised features
  ))


def mask_from_config(mask_config, rng, shape: tuple, features=None) -> MaskOutput:
  """compute_mask with strategy, ratio, dpc_k, d_c and normalize taken from mask_config."""
  shape = tuple(int(s) for s in shape)
  return compute_mask(mask_config.strategy, rng, shape=shape,
                      num_keep=num_keep(shape[2], mask_config.ratio), features=features,
                      dpc_k=mask_config.dpc_k, d_c=mask_config.d_c,
                      normalize=mask_config.normalize)
