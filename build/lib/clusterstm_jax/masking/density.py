"""Temporal density of teacher tokens (docs/method.md, step 3).

rho_tem(t, i) = sum over frames t' != t, over all tokens j of frame t', of exp(-d / d_c),
with d = 1 - cos(f[t, i], f[t', j]) the cosine distance between teacher features (d in [0, 2]).
A token whose content recurs in the other frames gets a high density; the masking keeps, in each
cluster, the token of highest temporal density.

Cost: the cosine-similarity GEMM over the clip's T*N tokens dominates (on CPU ~80% of the whole
'clusterstm' masking at the paper's shape). The similarity matrix is symmetric, so only the rows
of the first T//2 frames against all frames and the last frames against themselves are computed
(3/4 of the FLOPs, still two large GEMMs); the missing block is read column-wise. Its diagonal
blocks give the per-frame squared distances 2 - 2 cos that DPC needs on normalised features, so
the clustering needs no GEMM of its own.

d_c (DEFAULT_D_C = 0.1): cosine distances lie in [0, 2]; with d_c = 0.1 a near-copy (d = 0.05)
weighs 0.6, an unrelated token (d = 1) 5e-5, and the farthest (d = 2) 2e-9, so the sum counts
the near-matches of a token in the other frames, the "soft tube" the method wants. Sums are taken
as logsumexp (log-density), so a much smaller d_c cannot underflow into ties.
"""
import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.masking.dpc import MATMUL_PRECISION, l2_normalize, tidy_sq_dists

DEFAULT_D_C = 0.1


def check_d_c(d_c) -> None:
  if isinstance(d_c, bool) or not isinstance(d_c, (int, float)) or not d_c > 0:
    raise ValueError(f'temporal density d_c must be a positive number, got {d_c!r}')


def _lse_other_frames(logits: jax.Array, row_frames: range, col_frames: range) -> jax.Array:
  """logsumexp over the columns of logits [B, Tr, N, Tc, N] whose frame differs from the row's."""
  b, tr, n, tc, m = logits.shape
  same = np.asarray(row_frames)[:, None] == np.asarray(col_frames)[None, :]  # static [Tr, Tc]
  logits = jnp.where(same[:, None, :, None], -jnp.inf, logits)
  return jax.nn.logsumexp(logits.reshape(b, tr, n, tc * m), axis=-1)


def temporal_log_density_and_sq_dists(features: jax.Array, d_c: float = DEFAULT_D_C):
  """From features [B,T,N,D]: (log rho_tem [B,T,N], per-frame squared distances of the
  L2-normalised features [B,T,N,N]). log rho_tem is -inf when T == 1 (no other frame)."""
  if features.ndim != 4:
    raise ValueError(f'features must be [B, T, N, D], got shape {features.shape}')
  check_d_c(d_c)
  b, t, n, d = features.shape
  x = l2_normalize(features)
  gemm = lambda u, v: jnp.einsum('bid,bjd->bij', u, v, precision=MATMUL_PRECISION)
  if t == 1:
    sim = gemm(x[:, 0], x[:, 0])[:, None]
    return jnp.full((b, 1, n), -jnp.inf), tidy_sq_dists(2.0 - 2.0 * sim)

  h = t // 2  # frames [0, h) against all frames; frames [h, t) against themselves
  sim_a = gemm(x[:, :h].reshape(b, h * n, d), x.reshape(b, t * n, d)).reshape(b, h, n, t, n)
  sim_b = gemm(x[:, h:].reshape(b, (t - h) * n, d),
               x[:, h:].reshape(b, (t - h) * n, d)).reshape(b, t - h, n, t - h, n)
  logit_a = (sim_a - 1.0) / d_c  # = -d / d_c <= 0
  logit_b = (sim_b - 1.0) / d_c
  log_a = _lse_other_frames(logit_a, range(h), range(t))
  # Frames >= h see frames < h through the columns of the block sim_a[:, :, :, h:] (symmetry).
  from_first = jax.nn.logsumexp(logit_a[:, :, :, h:, :], axis=(1, 2))  # [B, t-h, N]
  log_b = jnp.logaddexp(from_first, _lse_other_frames(logit_b, range(h, t), range(h, t)))
  log_rho = jnp.concatenate([log_a, log_b], axis=1)

  diag_a = jnp.diagonal(sim_a[:, :, :, :h], axis1=1, axis2=3)  # [B, N, N, h]
  diag_b = jnp.diagonal(sim_b, axis1=1, axis2=3)               # [B, N, N, t-h]
  frame_sim = jnp.moveaxis(jnp.concatenate([diag_a, diag_b], axis=-1), -1, 1)
  return log_rho, tidy_sq_dists(2.0 - 2.0 * frame_sim)


def temporal_log_density(features: jax.Array, d_c: float = DEFAULT_D_C) -> jax.Array:
  """log rho_tem [B,T,N] of features [B,T,N,D] (the masking orders tokens by this)."""
  return temporal_log_density_and_sq_dists(features, d_c)[0]


def temporal_density(features: jax.Array, d_c: float = DEFAULT_D_C) -> jax.Array:
  """rho_tem [B,T,N] of features [B,T,N,D]; all zeros when T == 1 (no other frame)."""
  return jnp.exp(temporal_log_density(features, d_c))
