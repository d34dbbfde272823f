"""Every loss of the project: pure functions of model outputs (no params; randomness only
from keys passed in), with static shapes.

  VTC   video_text_similarity, vtc_loss          contrastive video-text (UMT)
  SigLIP sigmoid_loss, sigmoid_loss_frames       the teacher's own training
  MRM   relevance_target, student_relevance, mrm_loss   masked relevance modelling
  VTM   sample_hard_negatives, vtm_labels, vtm_loss     video-text matching
  MLM   mlm_mask, mlm_loss                       masked language modelling
  LM    lm_loss                                  teacher-forced decoders (QA, captioning)

Conventions: losses are computed in float32 whatever the input dtype; averages over an empty
set (no masked position, no selected token) are 0, never NaN; values at positions that do not
count are excluded with `where` (not multiplied by 0), so a NaN or inf there cannot leak in.
Under jit the batch is the *global* batch (GSPMD inserts the collectives), so contrastive losses
see every in-batch negative across devices and hosts, as UMT's all-gather does.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x, axis=-1, eps=1e-6):
  """x / |x| along `axis`, computed in (at least) float32: x * rsqrt(sum(x^2) + eps). A zero
  vector stays zero. The one normalisation of the project: contrastive features, the SigLIP
  teacher's embeddings, and the teacher tokens the masking clusters."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


# ----------------------------------------------------------------------------- VTC
def video_text_similarity(video_feat, text_feat):
  """Per-frame similarities averaged over frames (UMT).

  video_feat: [Bv, T, E] L2-normalised per frame; text_feat: [Bt, E] L2-normalised.
  Returns [Bv, Bt] mean over frames of the cosine similarity.
  """
  return jnp.einsum('vte,se->vs', video_feat, text_feat) / video_feat.shape[1]


def same_index(index):
  """bool [B, B]: True where two batch entries come from the same video (UMT's `idx`)."""
  index = jnp.asarray(index).reshape(-1)
  return index[:, None] == index[None, :]


def vtc_loss(sim_v2t, temperature, index=None):
  """Symmetric InfoNCE on a [B, B] video-text similarity matrix (UMT's VTC).

  Positives: pairs of the same video, P[i, j] = (index[i] == index[j]) (the diagonal when
  `index` is None). As UMT's sim_targets, each row's target spreads evenly over its positives:
    loss_v2t = -mean_i sum_j P[i,j] / sum_j' P[i,j'] * log softmax_j(sim[i, :] / tau)[j]
    loss_t2v = the same on the columns;   loss = (loss_v2t + loss_t2v) / 2
  """
  logits = sim_v2t.astype(jnp.float32) / temperature
  pos = (jnp.eye(logits.shape[0], dtype=bool) if index is None
         else same_index(index)).astype(jnp.float32)
  lv = -jnp.sum(jax.nn.log_softmax(logits, axis=1) * pos / pos.sum(1, keepdims=True), axis=1)
  lt = -jnp.sum(jax.nn.log_softmax(logits, axis=0) * pos / pos.sum(0, keepdims=True), axis=0)
  return 0.5 * (jnp.mean(lv) + jnp.mean(lt))


# ----------------------------------------------------------------------------- SigLIP
def sigmoid_loss(zimg, ztxt, t, b):
  """SigLIP's pairwise sigmoid loss. zimg, ztxt [N, D] (unnormalised; L2-normalised here),
  t: log temperature, b: bias (scalars or shape [1]). logits = <zi, zt> * exp(t) + b;
  +1 labels on the diagonal, -1 elsewhere; summed over texts, averaged over images."""
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"zimg and ztxt must both be [N, D], got {zimg.shape} and {ztxt.shape}")
  zi = zimg.astype(jnp.float32)
  zt = ztxt.astype(jnp.float32)
  zi = zi / (jnp.linalg.norm(zi, axis=-1, keepdims=True) + 1e-8)
  zt = zt / (jnp.linalg.norm(zt, axis=-1, keepdims=True) + 1e-8)
  t = jnp.reshape(jnp.asarray(t, jnp.float32), ())
  b = jnp.reshape(jnp.asarray(b, jnp.float32), ())
  logits = zi @ zt.T * jnp.exp(t) + b
  labels = 2.0 * jnp.eye(zi.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))


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


# ----------------------------------------------------------------------------- MRM
def _relevance(tokens, text_emb, in_batch: bool):
  if tokens.ndim != 4 or text_emb.ndim != 2 or tokens.shape[-1] != text_emb.shape[-1]:
    raise ValueError(f"relevance needs tokens [B,T,N,D] and text_emb [B or Bt, D] of the same "
                     f"D, got shapes {tokens.shape} and {text_emb.shape}")
  if not in_batch and text_emb.shape[0] != tokens.shape[0]:
    raise ValueError(f"paired relevance needs one caption per clip: tokens have B="
                     f"{tokens.shape[0]}, text_emb has {text_emb.shape[0]} rows "
                     f"(use in_batch=True for every caption of the batch)")
  v = l2_normalize(tokens.astype(jnp.float32))
  e = l2_normalize(text_emb.astype(jnp.float32))
  if in_batch:
    return jnp.einsum("btnd,sd->btns", v, e)
  return jnp.einsum("btnd,bd->btn", v, e)


def relevance_target(window_pooled, text_emb, *, in_batch: bool = False):
  """Teacher relevance at every token place (docs/method.md step 6), gradient stopped.

  window_pooled [B,T,N,Dt]: the teacher's MAP pooling of each token's k x k window;
  text_emb: the teacher's caption features, [B,Dt] (paired) or [Bt,Dt] (in_batch=True).
    paired:   r[b,t,n]   = <v[b,t,n] / |v[b,t,n]|, e[b] / |e[b]|>          -> [B,T,N]
    in-batch: r[b,t,n,s] = <v[b,t,n] / |v[b,t,n]|, e[s] / |e[s]|>          -> [B,T,N,Bt]
  """
  return jax.lax.stop_gradient(_relevance(window_pooled, text_emb, in_batch))


def student_relevance(decoded, text_emb, *, in_batch: bool = False, unit_tokens: bool = True):
  """The same formula as `relevance_target` on the student's decoded tokens, already projected
  to the teacher's width by the caller's model: decoded [B,T,N,Dt] -> [B,T,N] or [B,T,N,Bt].
  Gradients flow into `decoded` (and into `text_emb`; pass the teacher's, stopped, to match
  the target's text side). unit_tokens=False: the decoded tokens are not L2-normalised, so the
  relevance <decoded, e / |e|> has any scale (to regress a standardised target)."""
  if unit_tokens:
    return _relevance(decoded, text_emb, in_batch)
  e = l2_normalize(text_emb.astype(jnp.float32))
  spec = "btnd,sd->btns" if in_batch else "btnd,bd->btn"
  return jnp.einsum(spec, decoded.astype(jnp.float32), e)


def mrm_loss(student_rel, target_rel, keep_mask):
  """Masked relevance modelling: mean squared error over the MASKED places only.

  student_rel, target_rel: [B,T,N] (paired) or [B,T,N,Bt] (in-batch); keep_mask bool [B,T,N],
  True = visible. With M = {(b,t,n): not keep_mask[b,t,n]} and C captions (1 when paired):
    loss = sum_{(b,t,n) in M} sum_c (s[b,t,n,c] - r[b,t,n,c])^2 / (|M| * C),   0 when M is empty.
  """
  if student_rel.shape != target_rel.shape:
    raise ValueError(f"student_rel {student_rel.shape} and target_rel {target_rel.shape} differ")
  if student_rel.ndim not in (3, 4) or keep_mask.shape != student_rel.shape[:3]:
    raise ValueError(f"mrm_loss needs relevances [B,T,N] or [B,T,N,Bt] and keep_mask [B,T,N], "
                     f"got {student_rel.shape} and {keep_mask.shape}")
  masked = jnp.logical_not(keep_mask.astype(bool))
  if student_rel.ndim == 4:
    masked = jnp.broadcast_to(masked[..., None], student_rel.shape)
  sq = jnp.square(student_rel.astype(jnp.float32) - target_rel.astype(jnp.float32))
  total = jnp.sum(jnp.where(masked, sq, 0.0))
  count = jnp.sum(masked.astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def standardize_per_clip(rel, eps: float = 1e-6):
  """Relevance standardised within each clip (and caption): zero mean, unit variance over its
  T x N places. rel [B,T,N] or [B,T,N,Bt] -> same shape, float32:
    z[b,t,n(,c)] = (r - mean_{t,n} r[b,:,:(,c)]) / sqrt(var_{t,n} r[b,:,:(,c)] + eps)
  A clip whose relevance is constant maps to 0 everywhere (no NaN)."""
  r = rel.astype(jnp.float32)
  mean = jnp.mean(r, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(r - mean), axis=(1, 2), keepdims=True)
  return (r - mean) * jax.lax.rsqrt(var + eps)


def center_per_clip(rel):
  """rel minus its mean over each clip's (and caption's) T x N places, float32."""
  r = rel.astype(jnp.float32)
  return r - jnp.mean(r, axis=(1, 2), keepdims=True)


def mrm_baseline(target_rel, keep_mask):
  """The MRM loss of the best per-clip-constant predictor (one value per clip and caption,
  chosen knowing the target): the variance of the target over each clip's masked places,
  pooled as mrm_loss pools its squared errors. A loss that does not beat it carries no
  spatial signal. target_rel [B,T,N] or [B,T,N,Bt], keep_mask bool [B,T,N]."""
  masked = jnp.logical_not(keep_mask.astype(bool))
  if target_rel.ndim == 4:
    masked = jnp.broadcast_to(masked[..., None], target_rel.shape)
  r = target_rel.astype(jnp.float32)
  count = jnp.sum(masked.astype(jnp.float32), axis=(1, 2), keepdims=True)
  mean = jnp.sum(jnp.where(masked, r, 0.0), axis=(1, 2), keepdims=True) / jnp.maximum(count, 1)
  total = jnp.sum(jnp.where(masked, jnp.square(r - mean), 0.0))
  return total / jnp.maximum(jnp.sum(masked.astype(jnp.float32)), 1.0)


# ----------------------------------------------------------------------------- VTM
def sample_hard_negatives(sim_v2t, rng, *, temperature: float = 1.0, positive_mask=None,
                          hard_fraction: float = 1.0):
  """UMT's hard negatives: for every video a caption, for every caption a video, drawn from
  the softmax of their similarities with the positives excluded (no gradient).

  sim_v2t [B,B] (row: video, column: caption, pairs on the diagonal); positive_mask bool [B,B]
  (default: the diagonal; pass e.g. "same video id" to also exclude duplicate pairs).
    neg_text[i]  ~ p(j | i) = exp(sim[i,j]/tau) / sum_{j' not positive} exp(sim[i,j']/tau),
                   0 for positives
    neg_video[j] ~ p(i | j) = exp(sim[i,j]/tau) / sum_{i' not positive} exp(sim[i',j]/tau)
  Gumbel-max (jax.random.categorical) with -inf on the positives, so a positive is never drawn
  as long as its row / column has a non-positive entry (a row of positives only returns an
  arbitrary index; with the default mask that needs B = 1, which is rejected).
  hard_fraction < 1 mixes in easy negatives: each negative is the hard draw with probability
  hard_fraction, else drawn uniformly from the non-positives (0: random negatives only).
  Returns (neg_text_idx_for_each_video int32 [B], neg_video_idx_for_each_text int32 [B]).
  """
  if sim_v2t.ndim != 2 or sim_v2t.shape[0] != sim_v2t.shape[1]:
    raise ValueError(f"sim_v2t must be square [B, B], got shape {sim_v2t.shape}")
  bsz = sim_v2t.shape[0]
  if bsz < 2:
    raise ValueError(f"hard negatives need a batch of at least 2, got {bsz}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if positive_mask is None:
    positive_mask = jnp.eye(bsz, dtype=bool)
  elif positive_mask.shape != sim_v2t.shape:
    raise ValueError(f"positive_mask must be {sim_v2t.shape}, got {positive_mask.shape}")
  if not 0.0 <= hard_fraction <= 1.0:
    raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction!r}")
  logits = jax.lax.stop_gradient(sim_v2t).astype(jnp.float32) / temperature
  if hard_fraction == 0.0:
    logits = jnp.zeros_like(logits)
  logits = jnp.where(positive_mask, -jnp.inf, logits)
  key_t, key_v = jax.random.split(rng)
  neg_text = jax.random.categorical(key_t, logits, axis=1)
  neg_video = jax.random.categorical(key_v, logits, axis=0)
  if 0.0 < hard_fraction < 1.0:  # a second, uniform draw, chosen per negative
    key_t, key_v, key_pick = jax.random.split(jax.random.fold_in(rng, 1), 3)
    uniform = jnp.where(positive_mask, -jnp.inf, 0.0)
    easy_text = jax.random.categorical(key_t, uniform, axis=1)
    easy_video = jax.random.categorical(key_v, uniform, axis=0)
    hard_t, hard_v = jax.random.bernoulli(key_pick, hard_fraction, (2, bsz))
    neg_text = jnp.where(hard_t, neg_text, easy_text)
    neg_video = jnp.where(hard_v, neg_video, easy_video)
  return neg_text.astype(jnp.int32), neg_video.astype(jnp.int32)


def vtm_labels(batch_size: int):
  """int32 [3B]: 1 for the B positive pairs, 0 for the B (negative video, caption) and the B
  (video, negative caption) pairs, in that order."""
  return jnp.concatenate([jnp.ones((batch_size,), jnp.int32),
                          jnp.zeros((2 * batch_size,), jnp.int32)])


def vtm_loss(logits):
  """Video-text matching cross-entropy over [positive; negative video; negative text] pairs.

  logits [3B, 2] from the 2-way matching head (class 1 = match); labels y = vtm_labels(B):
    loss = -(1 / 3B) sum_i log softmax(logits[i])[y_i]
  """
  if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] % 3 or logits.shape[0] == 0:
    raise ValueError(f"vtm logits must be [3B, 2] (positives, negative videos, negative "
                     f"texts), got shape {logits.shape}")
  labels = vtm_labels(logits.shape[0] // 3)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


# ----------------------------------------------------------------------------- MLM
def _skip_excluded(values, excluded: Sequence[int]):
  """Maps uniform values in [0, V - len(excluded)) one-to-one onto [0, V) minus `excluded`
  (sorted, distinct): each excluded id at or below the running value pushes it up by one."""
  for e in sorted(excluded):
    values = values + (values >= e).astype(values.dtype)
  return values


def mlm_mask(ids, rng, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
             select_prob: float = 0.5, mask_prob: float = 0.8, random_prob: float = 0.1):
  """BERT's masking scheme on token ids (UMT: 50% selected; of those 80% [MASK], 10% a random
  token, 10% unchanged). Every token is selected independently with `select_prob`, except
  `special_ids` (pad / [CLS] / [SEP]: never selected). A selected token becomes mask_id with
  probability mask_prob, a random token with random_prob, else stays.
  Random replacements are uniform over the vocabulary without special_ids and mask_id, so a
  replacement never turns a token into padding (which would change the attention mask).

  ids int [B,L] -> (masked_ids int32 [B,L], targets int32 [B,L] = ids (only weighted places
  count), weights float32 [B,L] = 1 where selected, else 0). Deterministic given rng.
  """
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be integer [B, L], got shape {ids.shape} dtype {ids.dtype}")
  for name, p in dict(select_prob=select_prob, mask_prob=mask_prob,
                      random_prob=random_prob).items():
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {p!r}")
  if mask_prob + random_prob > 1.0 + 1e-9:
    raise ValueError(f"mask_prob + random_prob must be <= 1, got {mask_prob} + {random_prob}")
  if not 0 <= mask_id < vocab_size:
    raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")
  excluded = sorted({int(i) for i in special_ids} | {int(mask_id)})
  if any(not 0 <= e < vocab_size for e in excluded):
    raise ValueError(f"special_ids {list(special_ids)} must lie in [0, {vocab_size})")
  if vocab_size - len(excluded) < 1:
    raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token for random replacement")
  ids = ids.astype(jnp.int32)
  k_select, k_action, k_random = jax.random.split(rng, 3)
  specials = jnp.asarray(sorted({int(i) for i in special_ids}), jnp.int32)
  selectable = ~jnp.any(ids[..., None] == specials, axis=-1)
  selected = selectable & (jax.random.uniform(k_select, ids.shape) < select_prob)
  u = jax.random.uniform(k_action, ids.shape)
  to_mask = selected & (u < mask_prob)
  to_random = selected & (u >= mask_prob) & (u < mask_prob + random_prob)
  random_ids = _skip_excluded(
      jax.random.randint(k_random, ids.shape, 0, vocab_size - len(excluded), jnp.int32),
      excluded)
  masked_ids = jnp.where(to_mask, jnp.int32(mask_id), jnp.where(to_random, random_ids, ids))
  return masked_ids, ids, selected.astype(jnp.float32)


def mlm_loss(logits, targets, weights):
  """Masked-language-modelling cross-entropy, averaged over the selected tokens.

  logits [B,L,V], targets int [B,L], weights [B,L] (1 where selected):
    loss = sum_{b,l} w[b,l] * (-log softmax(logits[b,l])[targets[b,l]]) / sum_{b,l} w[b,l],
  0 when no token is selected.
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or weights.shape != targets.shape:
    raise ValueError(f"mlm_loss needs logits [B,L,V], targets and weights [B,L], got shapes "
                     f"{logits.shape}, {targets.shape}, {weights.shape}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  total = jnp.sum(jnp.where(w > 0, w * nll, 0.0))
  return total / jnp.maximum(jnp.sum(w), 1e-6)


# ----------------------------------------------------------------------------- LM
def lm_loss(logits: jnp.ndarray, ids: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
  """Teacher-forced next-token cross-entropy: logits[:, :-1] predict ids[:, 1:].

  Mean over the non-pad targets of the whole batch (0 when there are none); float32 scalar.
  logits [B,L,V] are the decoder's output on ids [B,L] (the same ids, shifted inside).
  """
  if logits.ndim != 3 or logits.shape[:2] != ids.shape:
    raise ValueError(f"lm_loss needs logits [B,L,V] and ids [B,L] with matching B, L; got "
                     f"shapes {logits.shape} and {ids.shape}")
  targets = ids[:, 1:]
  weights = (targets != pad_id).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), targets)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
