"""Shared transformer pieces: the variant table, fixed sin-cos position tables and the
big_vision-compatible blocks (MlpBlock, EncoderBlock, Encoder, MAPHead).

Parameter names follow big_vision's `models/vit.py` exactly (`encoderblock_{i}` with
`LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0/Dense_{0,1}`,
`encoder_norm`; MAPHead with `probe`), so public ViT / SigLIP checkpoints load by name.
Every parameter carries logical axis names (nn.with_logical_partitioning); key activations
carry logical constraints. Both are no-ops when no axis rules are set, so the modules also
run with plain `nn.unbox(params)` outside any mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Width / depth / MLP / heads per size name ("Pico" is for tests only; Mu and Nano are the
# shapes teacher/text tower and student video tower; So400m for SigLIP).
VARIANTS: dict[str, dict[str, int]] = {
    "Pico": dict(width=32, depth=1, mlp_dim=64, num_heads=2),
    "Mu": dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    "Nano": dict(width=128, depth=3, mlp_dim=512, num_heads=4),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}

ACT = ("batch", "length", "embed")  # logical axes of [B, L, D] activations

# ----------------------------------------------------------------------------- memory policy
# config.dtype: the dtype of activations and matmuls. Parameters, optimizer state, softmax,
# LayerNorm statistics and every loss stay float32 (flax computes LayerNorm statistics in f32
# and `attention` forces an f32 softmax); models return f32 features to the losses.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.remat: what a transformer block keeps for the backward pass (jax.checkpoint policies).
#   none           everything (no rematerialisation)
#   full           only the block's input; the block is recomputed in the backward pass
#   dots_saveable  matmul outputs (recomputes the elementwise ops between them)
#   dots_no_batch  matmul outputs without batch dimensions (projections, not attention logits)
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> the jnp dtype of activations and matmuls."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def policy(config) -> dict[str, Any]:
  """Model keyword arguments (dtype, remat) of a run config's `dtype` / `remat` fields
  (float32 / none when absent, e.g. in a config exported before they existed)."""
  remat = config.get("remat", "none")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  return dict(dtype=compute_dtype(config.get("dtype", "float32")), remat=remat)


def remat_block(block: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block` (an nn.Module class whose __call__ takes `deterministic` as its 5th positional
  argument after self) wrapped in nn.remat with the named policy; `block` itself for 'none'.
  The wrapped class keeps the parameter names (checkpoints load either way)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  if remat == "none":
    return block
  # deterministic is a Python bool (it switches dropout): static, so positional argument 5.
  return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=(5,))


def parse_variant(variant: str) -> tuple[dict[str, int], int | None]:
  """'B/16' -> (dict(width=768, depth=12, mlp_dim=3072, num_heads=12), 16); 'B' -> (dict, None)."""
  if not isinstance(variant, str) or not variant:
    raise ValueError(f"variant must be a string like 'B/16' or 'B', got {variant!r}")
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r} in {variant!r}; known: {sorted(VARIANTS)}")
  if patch and not (patch.isdigit() and int(patch) > 0):
    raise ValueError(f"bad patch size {patch!r} in variant {variant!r}")
  return dict(VARIANTS[name]), (int(patch) if patch else None)


def resolve_dims(variant: str, *, width: int | None = None, depth: int | None = None,
                 mlp_dim: int | None = None, num_heads: int | None = None,
                 patch_size: int | None = None) -> dict[str, Any]:
  """Variant defaults with every non-None override applied; checks width % heads."""
  dims, patch = parse_variant(variant)
  for key, value in dict(width=width, depth=depth, mlp_dim=mlp_dim,
                         num_heads=num_heads).items():
    if value is not None:
      dims[key] = int(value)
  dims["patch_size"] = int(patch_size) if patch_size is not None else patch
  if dims["width"] % dims["num_heads"]:
    raise ValueError(f"width {dims['width']} is not divisible by num_heads {dims['num_heads']}")
  if dims["depth"] < 0:
    raise ValueError(f"depth must be >= 0, got {dims['depth']}")
  return dims


def grid_size(image_size: int | tuple[int, int], patch: int) -> tuple[int, int]:
  """Patch grid (H//p, W//p) of an image; static Python ints. Floors like the VALID patch
  convolution (e.g. SigLIP So400m/14 at 384 px: 27 x 27, the last 6 pixel rows unused)."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if patch is None or patch <= 0:
    raise ValueError(f"patch size must be a positive int, got {patch!r}")
  if h < patch or w < patch:
    raise ValueError(f"image size {(h, w)} is smaller than the patch size {patch}")
  return h // patch, w // patch


def num_patches(image_size: int | tuple[int, int], patch: int) -> int:
  """N = (H/p) * (W/p) tokens per frame."""
  gh, gw = grid_size(image_size, patch)
  return gh * gw


# ----------------------------------------------------------------------------- position tables
def _sincos_1d(pos: np.ndarray, dim: int, temperature: float) -> np.ndarray:
  """MAE's 1-D table: [sin(pos * w_k), cos(pos * w_k)], w_k = temperature^(-k / (dim/2))."""
  omega = 1.0 / temperature ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
  angles = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_posemb_2d(h: int, w: int, dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D table [h*w, dim] (row-major over (y, x)): first half encodes y, second x."""
  if dim % 4:
    raise ValueError(f"sincos_posemb_2d needs dim % 4 == 0, got {dim}")
  y, x = np.mgrid[:h, :w]
  table = np.concatenate([_sincos_1d(y, dim // 2, temperature),
                          _sincos_1d(x, dim // 2, temperature)], axis=1)
  return table.astype(np.float32)


def sincos_posemb_3d(t: int, h: int, w: int, dim: int,
                     temperature: float = 10_000.) -> np.ndarray:
  """Fixed space-time table [t, h*w, dim], UMT layout: the first dim/4 channels encode time,
  the remaining 3*dim/4 the 2-D position (sincos_posemb_2d). Frame 0 of any t is identical,
  so an image (t=1) gets exactly the table of a video's first frame."""
  if dim % 16:
    raise ValueError(f"sincos_posemb_3d needs dim % 16 == 0, got {dim}")
  dim_t = dim // 4
  temporal = _sincos_1d(np.arange(t), dim_t, temperature).astype(np.float32)  # [t, dim/4]
  spatial = sincos_posemb_2d(h, w, dim - dim_t, temperature)  # [h*w, 3dim/4]
  return np.concatenate([np.broadcast_to(temporal[:, None], (t, h * w, dim_t)),
                         np.broadcast_to(spatial[None], (t, h * w, dim - dim_t))], axis=-1)


# ----------------------------------------------------------------------------- blocks
def _part(init, names):
  return nn.with_logical_partitioning(init, names)


# MLP activations by name. "gelu_tanh" (flax's default nn.gelu) is big_vision's and SigLIP's
# ("gelu_pytorch_tanh" in transformers); CLIP uses "quick_gelu"; some CLIPs the exact "gelu".
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown MLP activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(dtype: Dtype = jnp.float32, name: str | None = None,
               eps: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm (eps 1e-6 as big_vision; CLIP uses 1e-5) with logically named scale/bias."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=_part(nn.initializers.ones, ("norm",)),
                      bias_init=_part(nn.initializers.zeros, ("norm",)))


class _FlatInitPartitioned(nn.LogicallyPartitioned):
  """Names for a kernel that nn.DenseGeneral initialises flat and then reshapes.

  DenseGeneral calls the initializer with a flattened 2-D shape and reshapes the result
  through `unbox()` / `replace_boxed()`. A plain LogicallyPartitioned would apply its (3-D)
  names as a sharding constraint to the flat value whenever a mesh and rules are active,
  which fails; this box skips the constraint on the flat value and re-boxes the reshaped one.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value

  def replace_boxed(self, val):
    return nn.LogicallyPartitioned(val, self.names, mesh=self.mesh, rules=self.rules)


def _dense_general_part(init, names):
  def wrapped(key, shape, dtype=jnp.float32):
    return _FlatInitPartitioned(init(key, shape, dtype), names)
  return wrapped


def attention(num_heads: int, dtype: Dtype = jnp.float32,
              name: str | None = None) -> nn.MultiHeadDotProductAttention:
  """big_vision's attention (xavier-uniform kernels, zero biases) with logical names."""
  xavier = nn.initializers.xavier_uniform()
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=dtype, name=name, force_fp32_for_softmax=True,
      kernel_init=_dense_general_part(xavier, ("embed", "heads", "kv")),
      out_kernel_init=_dense_general_part(xavier, ("heads", "kv", "embed")),
      bias_init=_dense_general_part(nn.initializers.zeros, ("heads", "kv")),
      out_bias_init=_part(nn.initializers.zeros, ("embed",)))


def key_mask(mask: jnp.ndarray | None) -> jnp.ndarray | None:
  """Key padding mask [B, K] (True = attend) -> attention mask [B, 1(heads), 1(q), K]."""
  if mask is None:
    return None
  if mask.ndim != 2:
    raise ValueError(f"key padding mask must be [batch, keys], got shape {mask.shape}")
  return mask.astype(bool)[:, None, None, :]


class MlpBlock(nn.Module):
  """Dense -> act -> dropout -> Dense (children Dense_0, Dense_1 as big_vision)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    d = x.shape[-1]
    xavier = nn.initializers.xavier_uniform()
    bias = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_part(xavier, ("embed", "mlp")),
                 bias_init=_part(bias, ("mlp",)))(x)
    x = activation(self.act)(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_part(xavier, ("mlp", "embed")),
                    bias_init=_part(bias, ("embed",)))(x)


class EncoderBlock(nn.Module):
  """Pre-LN block: self-attention, [cross-attention], MLP, each on a residual branch.

  With cross_attention=True the block needs `context` [B, M, Dc] and adds children
  `cross_norm` / `cross_attention` (explicit names, so the big_vision auto-names
  LayerNorm_0/1, MultiHeadDotProductAttention_0, MlpBlock_0 stay the same).
  Masks are key padding masks: `mask` [B, L] for self-attention, `context_mask` [B, M].
  `act` / `ln_eps` only change the computation (for external checkpoints such as CLIP).
  post_ln: BERT's post-LN order instead, each norm after its residual sum (x = LN(x + f(x)));
    the same parameters and names. drop_path: stochastic depth, the rate at which a sample's
    residual branch is dropped in training (rescaled by 1/(1 - rate), as timm's DropPath).
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  post_ln: bool = False
  drop_path: float = 0.0

  def _residual(self, x, y, norm, deterministic):
    """x + branch y (dropout, then drop path), with `norm` before (pre-LN: applied by the
    caller to the branch input) or after the sum (post-LN)."""
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    if self.drop_path > 0:  # one keep/drop draw per sample: broadcast over tokens and width
      y = nn.Dropout(rate=self.drop_path, broadcast_dims=tuple(range(1, y.ndim)))(
          y, deterministic)
    x = x + y
    return nn.with_logical_constraint(norm(x) if self.post_ln else x, ACT)

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None,
               deterministic: bool = True):
    if self.cross_attention and context is None:
      raise ValueError("this EncoderBlock has cross_attention=True and needs `context`")
    if not self.cross_attention and context is not None:
      raise ValueError("`context` given to an EncoderBlock built with cross_attention=False")
    pre = (lambda norm, v: v) if self.post_ln else (lambda norm, v: norm(v))
    x = nn.with_logical_constraint(x, ACT)
    norm = layer_norm(self.dtype, eps=self.ln_eps)
    y = pre(norm, x)
    y = attention(self.num_heads, self.dtype)(y, y, mask=key_mask(mask))
    x = self._residual(x, y, norm, deterministic)

    if self.cross_attention:
      norm = layer_norm(self.dtype, name="cross_norm", eps=self.ln_eps)
      y = attention(self.num_heads, self.dtype, name="cross_attention")(
          pre(norm, x), context, mask=key_mask(context_mask))
      x = self._residual(x, y, norm, deterministic)

    norm = layer_norm(self.dtype, eps=self.ln_eps)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act)(
        pre(norm, x), deterministic=deterministic)
    return self._residual(x, y, norm, deterministic)


class Encoder(nn.Module):
  """`depth` EncoderBlocks named encoderblock_{i}, then LayerNorm `encoder_norm`.

  Returns (normed output, {'block{i:02d}': block outputs, 'pre_ln': input of the norm}).
  post_ln: BERT's post-LN blocks and no final norm (the output is the last block's).
  drop_path: stochastic depth rising linearly from 0 at the first block to this rate at the
    last (timm's and UMT's schedule).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  remat: str = "none"  # a REMAT_POLICIES name, applied to every block
  post_ln: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None, *,
               deterministic: bool = True):
    out = {}
    block = remat_block(EncoderBlock, self.remat)
    for i in range(self.depth):
      rate = self.drop_path * i / (self.depth - 1) if self.depth > 1 else 0.0
      x = block(self.mlp_dim, self.num_heads, self.dropout, self.cross_attention,
                self.dtype, self.act, self.ln_eps, post_ln=self.post_ln, drop_path=rate,
                name=f"encoderblock_{i}")(x, mask, context, context_mask, deterministic)
      out[f"block{i:02d}"] = x
    out["pre_ln"] = x
    if self.post_ln:
      return x, out
    return layer_norm(self.dtype, name="encoder_norm", eps=self.ln_eps)(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens.

  __call__(x [N, K, D], mask [N, K] or None) -> [N, D]. Children: `probe`,
  MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0.
  windows(grid [M, h, w, D], k) -> [M, h, w, D]: the same pooling of every token's k x k
  spatial window (clipped at borders), computed once per token instead of once per window.
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  width: int = 0  # the tokens' width D (the probe's size)

  def setup(self):
    if self.width <= 0:
      raise ValueError(f"MAPHead needs the token width, got width={self.width}")
    # Setup-style with the names @nn.compact gave them (checkpoints and big_vision agree).
    self.probe = self.param("probe", _part(nn.initializers.xavier_uniform(), (None, None, "embed")),
                            (1, 1, self.width), jnp.float32)
    self.MultiHeadDotProductAttention_0 = attention(self.num_heads, self.dtype)  # pylint: disable=invalid-name
    self.LayerNorm_0 = layer_norm(self.dtype)  # pylint: disable=invalid-name
    self.MlpBlock_0 = MlpBlock(self.mlp_dim, dtype=self.dtype)  # pylint: disable=invalid-name

  def _finish(self, x):
    return x + self.MlpBlock_0(self.LayerNorm_0(x))

  def __call__(self, x, mask=None):
    if x.ndim != 3:
      raise ValueError(f"MAPHead input must be [batch, tokens, dim], got shape {x.shape}")
    n, _, d = x.shape
    if d != self.width:
      raise ValueError(f"MAPHead of width {self.width} got tokens of width {d}")
    probe = jnp.tile(self.probe.astype(x.dtype), [n, 1, 1])
    x = self.MultiHeadDotProductAttention_0(probe, x, mask=key_mask(mask))
    return self._finish(x)[:, 0]

  def windows(self, grid, k: int = 3):
    """MAP pooling of every token with its k x k neighbours, exactly __call__ on each window.

    One probe query: its logit for key j is x_j . (W_k q) + b_k . q, and the values are a
    projection of x_j, so both are computed once per token and gathered per window (a token
    sits in k*k windows). The windowed path costs ~k*k times fewer key/value FLOPs.
    """
    if grid.ndim != 4 or k % 2 != 1:
      raise ValueError(f"windows needs grid [M, h, w, D] and an odd k, got {grid.shape}, k={k}")
    m, h, w, d = grid.shape
    x = grid.astype(self.dtype)
    p = self.MultiHeadDotProductAttention_0.variables["params"]
    cast = lambda a: jnp.asarray(a, self.dtype)
    q = jnp.einsum("d,dhc->hc", cast(self.probe)[0, 0], cast(p["query"]["kernel"]))
    q = (q + cast(p["query"]["bias"])) / jnp.sqrt(q.shape[-1]).astype(self.dtype)
    logit = (jnp.einsum("mijd,dhc,hc->mijh", x, cast(p["key"]["kernel"]), q)
             + jnp.einsum("hc,hc->h", cast(p["key"]["bias"]), q))
    v = jnp.einsum("mijd,dhc->mijhc", x, cast(p["value"]["kernel"])) + cast(p["value"]["bias"])
    r = k // 2
    big_neg = jnp.finfo(logit.dtype).min  # what flax's masked softmax uses
    logit = jnp.pad(logit, ((0, 0), (r, r), (r, r), (0, 0)), constant_values=big_neg)
    v = jnp.pad(v, ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))
    offs = [(dy, dx) for dy in range(k) for dx in range(k)]
    logits = jnp.stack([logit[:, dy:dy + h, dx:dx + w] for dy, dx in offs], axis=-1)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = sum(weights[..., i, None] * v[:, dy:dy + h, dx:dx + w]
              for i, (dy, dx) in enumerate(offs))  # [m, h, w, H, c]
    out = jnp.einsum("mijhc,hcd->mijd", out, cast(p["out"]["kernel"])) + cast(p["out"]["bias"])
    return self._finish(out)
