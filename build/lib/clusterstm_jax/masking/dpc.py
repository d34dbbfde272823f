"""DPC-KNN (density peaks clustering with k-nearest-neighbour density) within every frame.

This file owns docs/method.md step 2: the intra-frame clustering of teacher tokens. Pure jnp, static
shapes, batched over any leading dims: features [..., N, D] are clustered independently per
trailing [N, D] slice (one frame).

Algorithm (DPC-KNN as used in token clustering, e.g. TCFormer):
  * distances are Euclidean on the features as given (``normalize=True`` L2-normalises first,
    which makes the squared distance 2 - 2 cos);
  * local density rho_i = exp(-mean squared distance to the k nearest neighbours, self excluded);
  * delta_i = distance to the nearest token of higher density; for the global peak (no token
    above it) delta is the largest pairwise distance in the frame, so the peak is always a centre;
  * centres = top-N_c tokens by rho * delta; every token joins its nearest centre and every
    centre joins its own cluster, so no cluster is empty.

Determinism and ties (all exact, no random epsilon):
  * "higher density" is the strict total order (log_rho_j > log_rho_i) or (equal and j < i):
    exactly one global peak exists even when features are duplicated;
  * centres are ranked by the score, equal scores -> lower token index first (lax.top_k's rule);
    cluster id c is the rank of its centre, so cluster 0 is the strongest peak;
  * a token equidistant from several centres joins the lowest cluster id.

Numerics: ordering uses log_rho = -mean squared kNN distance and the score log_rho + log(delta),
which orders tokens exactly like rho * delta but does not underflow for wide raw features (where
exp(-d^2) is 0 in float32 for every token). ``rho`` itself is returned as exp(log_rho).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Clustering decides which tokens the student sees; bf16 matmul passes (TPU default) would let
# rounding reorder near-equal densities, and this matmul is tiny next to the student.
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


class DPCResult(NamedTuple):
  """Per-frame clustering. Leading dims are those of the features."""
  cluster_assign: jax.Array  # int32 [..., N] in [0, N_c); cluster c is centred on centers[c]
  centers: jax.Array         # int32 [..., N_c] token index of each centre, by descending score
  rho: jax.Array             # float32 [..., N] local density exp(-mean sq kNN distance)
  log_rho: jax.Array         # float32 [..., N] log of rho (finite even when rho underflows)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(|x|, eps) along the last axis, in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def pairwise_sq_dists(x: jax.Array) -> jax.Array:
  """Squared Euclidean distances [..., N, N] between the rows of x [..., N, D].

  Matmul form |a|^2 + |b|^2 - 2 a.b (one batched GEMM instead of an [N, N, D] difference
  tensor), clamped at 0, symmetrised and with an exact zero diagonal.
  """
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1)
  gram = jnp.einsum('...nd,...md->...nm', x, x, precision=MATMUL_PRECISION)
  return tidy_sq_dists(sq[..., :, None] + sq[..., None, :] - 2.0 * gram)


def tidy_sq_dists(d2: jax.Array) -> jax.Array:
  """Clamps GEMM rounding (d2 >= 0), symmetrises and zeroes the diagonal of d2 [..., N, N]."""
  d2 = jnp.maximum(d2, 0.0)
  # Exact symmetry keeps duplicate features interchangeable, so ties follow the index rule only.
  d2 = 0.5 * (d2 + jnp.swapaxes(d2, -1, -2))
  return jnp.where(jnp.eye(d2.shape[-1], dtype=bool), 0.0, d2)


def check_dpc_args(num_tokens: int, num_clusters: int, k: int) -> None:
  """ValueError (one line) for cluster counts or k that DPC-KNN cannot honour."""
  if not isinstance(k, int) or not 1 <= k <= num_tokens - 1:
    raise ValueError(f'dpc k must be an int in [1, N-1] = [1, {num_tokens - 1}], got {k!r}')
  if not isinstance(num_clusters, int) or not 1 <= num_clusters <= num_tokens:
    raise ValueError(
        f'number of clusters must be an int in [1, N] = [1, {num_tokens}], got {num_clusters!r}')


def dpc_knn_from_sq_dists(d2: jax.Array, num_clusters: int, k: int = 5) -> DPCResult:
  """DPC-KNN given squared distances d2 [..., N, N] (symmetric, zero diagonal)."""
  n = d2.shape[-1]
  if d2.ndim < 2 or d2.shape[-2] != n:
    raise ValueError(f'squared distances must be [..., N, N], got shape {d2.shape}')
  check_dpc_args(n, num_clusters, k)
  idx = jnp.arange(n)
  eye = idx[:, None] == idx[None, :]

  # Local density from the k nearest neighbours; self excluded by pushing it to -inf.
  neg_knn, _ = jax.lax.top_k(jnp.where(eye, -jnp.inf, -d2), k)
  log_rho = jnp.mean(neg_knn, axis=-1)

  # Strict total order on density: higher[..., i, j] <=> token j is above token i.
  lr_i, lr_j = log_rho[..., :, None], log_rho[..., None, :]
  higher = (lr_j > lr_i) | ((lr_j == lr_i) & (idx[None, :] < idx[:, None]))
  dist = jnp.sqrt(d2)
  d_higher = jnp.min(jnp.where(higher, dist, jnp.inf), axis=-1)
  is_peak = ~jnp.any(higher, axis=-1)  # exactly one per frame
  d_max = jnp.max(dist, axis=(-2, -1))[..., None]
  delta = jnp.where(is_peak, d_max, d_higher)

  # log(rho * delta); delta == 0 (a duplicate of a denser token) gives -inf, never NaN.
  score = log_rho + jnp.log(delta)
  _, centers = jax.lax.top_k(score, num_clusters)

  # Nearest centre, through the centre rows of the symmetric d2: [..., N_c, N].
  d_rows = jnp.take_along_axis(d2, centers[..., :, None], axis=-2)
  is_self = centers[..., :, None] == idx
  d_rows = jnp.where(is_self, -1.0, d_rows)  # a centre always joins its own cluster
  assign = jnp.argmin(d_rows, axis=-2)  # first minimum -> lowest cluster id on ties
  return DPCResult(cluster_assign=assign.astype(jnp.int32), centers=centers.astype(jnp.int32),
                   rho=jnp.exp(log_rho), log_rho=log_rho)


def dpc_knn(features: jax.Array, num_clusters: int, *, k: int = 5,
            normalize: bool = False) -> DPCResult:
  """Clusters the N tokens of every frame of features [..., N, D] into num_clusters clusters.

  Args:
    features: [..., N, D] token features, any float dtype (computed in float32).
    num_clusters: N_c, static, in [1, N].
    k: neighbours for the local density, static, in [1, N-1].
    normalize: L2-normalise the features first (distances then depend on direction only).
  Returns:
    DPCResult(cluster_assign int32 [..., N], centers int32 [..., N_c], rho [..., N], log_rho).
  """
  if features.ndim < 2:
    raise ValueError(f'features must be [..., N, D], got shape {features.shape}')
  x = l2_normalize(features) if normalize else features.astype(jnp.float32)
  return dpc_knn_from_sq_dists(pairwise_sq_dists(x), num_clusters, k)
