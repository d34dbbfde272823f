"""Masking statistics, computed on device inside the train step (no host round-trip).

``token_objects`` turns per-pixel object labels (the synthetic "shapes" data: 0 = background,
k + 1 = object k) into token-level object membership on the ViT patch grid (row-major, the
order of the patch embedding); ``mask_stats`` summarises a keep mask against it:

  object_coverage      of the (object, frame) pairs where the object is visible, the fraction with
                       >= 1 kept token on the object (random masking at high ratios loses whole
                       objects; cluster masking should not);
  kept_on_objects      fraction of kept tokens lying on some object;
  object_area          fraction of all tokens lying on some object (chance level of the above);
  temporal_recurrence  fraction of kept positions of frame t also kept at t + 1 (1 for tube
                       masking, ~N_c / N for random; 0 when T == 1).

All values are float32 scalars averaged over the (global) batch. Empty denominators give
coverage 1 (nothing to miss) and fractions 0, never NaN.
"""
import jax
import jax.numpy as jnp


def token_objects(labels: jax.Array, patch: int, max_objects: int = 3,
                  min_fraction: float = 0.0) -> jax.Array:
  """Token-level object membership: labels [B,T,H,W] -> bool [B,T,N,K], N = (H/p)(W/p).

  A token covers object k (label k + 1) if any pixel of its patch has that label and, when
  min_fraction > 0, at least that fraction of its pixels do. Labels above max_objects are ignored.
  """
  if labels.ndim != 4:
    raise ValueError(f'labels must be [B, T, H, W], got shape {labels.shape}')
  b, t, h, w = labels.shape
  if not isinstance(patch, int) or patch < 1 or h % patch or w % patch:
    raise ValueError(f'patch {patch!r} must be a positive int dividing H, W = {h}, {w}')
  if not isinstance(max_objects, int) or max_objects < 1:
    raise ValueError(f'max_objects must be a positive int, got {max_objects!r}')
  if not 0.0 <= min_fraction <= 1.0:
    raise ValueError(f'min_fraction must be in [0, 1], got {min_fraction!r}')
  hp, wp = h // patch, w // patch
  x = labels.astype(jnp.int32).reshape(b, t, hp, patch, wp, patch)
  ids = jnp.arange(1, max_objects + 1, dtype=jnp.int32)
  counts = jnp.sum(x[..., None] == ids, axis=(3, 5), dtype=jnp.int32)  # [B,T,hp,wp,K]
  counts = counts.reshape(b, t, hp * wp, max_objects)
  covered = counts > 0
  if min_fraction > 0:
    covered &= counts >= min_fraction * patch * patch
  return covered


def _ratio(num, den, empty):
  num, den = num.astype(jnp.float32), den.astype(jnp.float32)
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.float32(empty))


def mask_stats(keep_mask: jax.Array, token_obj: jax.Array) -> dict:
  """Scalar statistics of keep_mask bool [B,T,N] against token_obj bool [B,T,N,K]."""
  if keep_mask.ndim != 3 or token_obj.ndim != 4 or token_obj.shape[:3] != keep_mask.shape:
    raise ValueError(f'keep_mask [B,T,N] and token_obj [B,T,N,K] disagree: '
                     f'{keep_mask.shape} vs {token_obj.shape}')
  keep = keep_mask.astype(bool)
  obj = token_obj.astype(bool)
  present = jnp.any(obj, axis=2)                           # [B,T,K]
  covered = jnp.any(obj & keep[..., None], axis=2)         # [B,T,K]
  on_obj = jnp.any(obj, axis=-1)                           # [B,T,N]
  stats = dict(
      object_coverage=_ratio(jnp.sum(covered), jnp.sum(present), 1.0),
      kept_on_objects=_ratio(jnp.sum(keep & on_obj), jnp.sum(keep), 0.0),
      object_area=jnp.mean(on_obj.astype(jnp.float32)),
  )
  if keep.shape[1] > 1:
    stats['temporal_recurrence'] = _ratio(jnp.sum(keep[:, :-1] & keep[:, 1:]),
                                          jnp.sum(keep[:, :-1]), 0.0)
  else:
    stats['temporal_recurrence'] = jnp.zeros((), jnp.float32)
  return stats
