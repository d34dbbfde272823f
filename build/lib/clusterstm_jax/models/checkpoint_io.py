"""Reading external checkpoints into our parameter trees: the shared machinery behind each
model file's `load()`.

Owns: flatten/unflatten of nested dicts with '/' names; the file readers of weight_files.py
(big_vision `.npz`, Hugging Face safetensors), re-exported here; big_vision's
position-embedding resampling; the torch -> flax layout conversions of transformers' layers;
and `assign`, the strict matcher that turns converted arrays into a params tree shaped like a
template, reporting missing, unused and wrongly shaped parameters by name.

A model file's loader opens the checkpoint as a `Source` (which records every key it takes or
ignores, with the reason), fills a `Converted` (our name -> array, with the checkpoint key it
came from, shape-checked against the template on entry) and hands both to `assign`. No torch:
safetensors are read through `safetensors.numpy`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Iterable

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import scipy.ndimage

from clusterstm_jax.models.weight_files import CheckpointError
from clusterstm_jax.models.weight_files import check_file
from clusterstm_jax.models.weight_files import read_hf_config  # noqa: F401 (re-exported)
from clusterstm_jax.models.weight_files import read_npz  # noqa: F401 (re-exported)
from clusterstm_jax.models.weight_files import read_safetensors  # noqa: F401 (re-exported)

SEP = "/"
_SHOW = 20  # names listed in one error message before "... and N more"


def _names(names: Iterable[str]) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
  return ", ".join(names[:_SHOW]) + more


# ----------------------------------------------------------------------------- trees
def flatten(tree: Mapping, sep: str = SEP) -> dict[str, Any]:
  """Nested mappings -> {'a/b/c': leaf}. Anything that is not a Mapping is a leaf (arrays,
  ShapeDtypeStructs and flax's LogicallyPartitioned boxes alike)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{sep}{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        walk(value, name)
      else:
        flat[name] = value
  walk(tree, "")
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts (inverse of `flatten`)."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"name {name!r} goes through a leaf at {part!r}")
    node[leaf] = value
  return tree


def _unbox(leaf):
  return leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def template_shapes(template: Mapping) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of a params tree (with or without the outer 'params' collection)."""
  return {k: tuple(_unbox(v).shape) for k, v in flatten(_params_of(template)).items()}


def _params_of(template: Mapping) -> Mapping:
  return template["params"] if set(template) == {"params"} else template


# ----------------------------------------------------------------------------- readers
class Source:
  """A checkpoint's flat arrays, recording which keys a loader took or ignored (and why)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if self.path.endswith(".npz"):
      self.format, self.arrays = "npz", read_npz(self.path)
    elif self.path.endswith(".safetensors") or os.path.isdir(self.path):
      self.format, self.arrays = "safetensors", read_safetensors(self.path)
    else:
      check_file(self.path)
      raise CheckpointError(f"unknown checkpoint format for {self.path}: expected a big_vision "
                            f".npz, a .safetensors file or a transformers model directory")
    self.hf_config = read_hf_config(self.path) if self.format == "safetensors" else None
    self.taken: set[str] = set()
    self.ignored: dict[str, str] = {}
    self.hints: dict[str, str] = {}  # key -> what to change so that it would be used

  def __contains__(self, key: str) -> bool:
    return key in self.arrays

  def take(self, key: str) -> np.ndarray:
    if key not in self.arrays:
      raise CheckpointError(f"{self.path} has no key {key!r}")
    self.taken.add(key)
    return self.arrays[key]

  def ignore(self, prefix: str, reason: str) -> None:
    """Marks every not-yet-taken key starting with `prefix` as unused by design."""
    for key in self.arrays:
      if key.startswith(prefix) and key not in self.taken:
        self.ignored.setdefault(key, reason)

  def ignore_outside(self, prefix: str, reason: str) -> None:
    """Marks every key NOT starting with `prefix` as unused by design (e.g. the other tower)."""
    for key in self.arrays:
      if not key.startswith(prefix) and key not in self.taken:
        self.ignored.setdefault(key, reason)

  def hint(self, key: str, text: str) -> None:
    if key in self.arrays:
      self.hints[key] = text

  def remaining(self) -> list[str]:
    return sorted(k for k in self.arrays if k not in self.taken and k not in self.ignored)


# ----------------------------------------------------------------------------- conversion
class Converted:
  """Our flat name -> (array, checkpoint key it came from), checked against the template."""

  def __init__(self, source: Source, tshapes: Mapping[str, tuple[int, ...]]):
    self.source, self.tshapes = source, tshapes
    self.values: dict[str, tuple[np.ndarray, str]] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.tshapes

  def put(self, name: str, array: np.ndarray, origin: str) -> None:
    if name not in self.tshapes:
      raise CheckpointError(f"{self.source.path}: {origin!r} maps to {name!r}, which this model "
                            f"does not have")
    want = self.tshapes[name]
    if tuple(array.shape) != want:
      raise CheckpointError(
          f"shape mismatch for parameter {name!r}: checkpoint {self.source.path} key {origin!r} "
          f"gives {tuple(array.shape)} but the model expects {want}")
    self.values[name] = (array, origin)

  def take(self, name: str, key: str, fn=None) -> None:
    """put(name, fn(source.take(key))) -- the usual one-key case."""
    arr = self.source.take(key)
    self.put(name, fn(arr) if fn else arr, key)


def _split_heads(arr: np.ndarray, want: tuple[int, ...], kind: str, name: str, origin: str):
  """[D, H*hd] -> [D, H, hd] (kind 'in'), [H*hd] -> [H, hd] ('bias'), [H*hd, D] -> [H, hd, D]
  ('out'), with the number of heads taken from the template shape."""
  ok = {"in": len(want) == 3 and arr.shape == (want[0], want[1] * want[2]),
        "bias": len(want) == 2 and arr.shape == (want[0] * want[1],),
        "out": len(want) == 3 and arr.shape == (want[0] * want[1], want[2])}[kind]
  if not ok:
    raise CheckpointError(f"shape mismatch for parameter {name!r}: checkpoint key {origin!r} "
                          f"gives {arr.shape} (after transposing) but the model expects {want}")
  return arr.reshape(want)


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def put_hf_linear(out: Converted, ours: str, hf: str) -> None:
  """torch nn.Linear `hf.weight` [out, in] / `hf.bias` -> flax Dense kernel [in, out] / bias."""
  out.take(f"{ours}/kernel", f"{hf}.weight", lambda w: w.T)
  out.take(f"{ours}/bias", f"{hf}.bias")


def put_hf_layer_norm(out: Converted, ours: str, hf: str) -> None:
  out.take(f"{ours}/scale", f"{hf}.weight")
  out.take(f"{ours}/bias", f"{hf}.bias")


def put_attention(out: Converted, ours: str, q, k, v, o, origin: str) -> None:
  """q/k/v/o = (weight [D_out, D_in], bias) in torch layout -> flax MultiHeadDotProductAttention
  `query/key/value` kernel [D, H, hd] / bias [H, hd] and `out` kernel [H, hd, D] / bias [D]."""
  def put(name, arr, kind):
    if name not in out:
      out.put(name, arr, origin)  # raises: the model has no such parameter
    out.put(name, _split_heads(arr, out.tshapes[name], kind, name, origin), origin)
  for part, (w, b) in zip(("query", "key", "value"), (q, k, v)):
    put(f"{ours}/{part}/kernel", w.T, "in")
    put(f"{ours}/{part}/bias", b, "bias")
  put(f"{ours}/out/kernel", o[0].T, "out")
  out.put(f"{ours}/out/bias", o[1], origin)


def put_hf_encoder_layer(out: Converted, ours: str, hf: str) -> None:
  """A transformers CLIP/SigLIP encoder layer (pre-LN: layer_norm1, self_attn, layer_norm2,
  mlp.fc1/fc2) -> our common.EncoderBlock (LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0/Dense_0/1)."""
  src = out.source
  put_hf_layer_norm(out, f"{ours}/LayerNorm_0", f"{hf}.layer_norm1")
  wb = lambda p: (src.take(f"{hf}.self_attn.{p}.weight"), src.take(f"{hf}.self_attn.{p}.bias"))
  put_attention(out, f"{ours}/MultiHeadDotProductAttention_0", wb("q_proj"), wb("k_proj"),
                wb("v_proj"), wb("out_proj"), f"{hf}.self_attn")
  put_hf_layer_norm(out, f"{ours}/LayerNorm_1", f"{hf}.layer_norm2")
  put_hf_linear(out, f"{ours}/MlpBlock_0/Dense_0", f"{hf}.mlp.fc1")
  put_hf_linear(out, f"{ours}/MlpBlock_0/Dense_1", f"{hf}.mlp.fc2")


def hf_num_layers(source: Source, prefix: str) -> int:
  """Number of `{prefix}.{i}.` layers present in the checkpoint."""
  ids = {int(k[len(prefix) + 1:].split(".", 1)[0]) for k in source.arrays
         if k.startswith(prefix + ".") and k[len(prefix) + 1:].split(".", 1)[0].isdigit()}
  if ids and ids != set(range(len(ids))):
    raise CheckpointError(f"{source.path}: layers under {prefix!r} are not numbered 0..n-1: "
                          f"{sorted(ids)}")
  return len(ids)


def check_depth(source: Source, ours: int, theirs: int, what: str) -> None:
  if ours != theirs:
    raise CheckpointError(f"depth mismatch for {what}: checkpoint {source.path} has {theirs} "
                          f"layers but the model has {ours}")


def convert_pre_linen(keys: Iterable[str]) -> dict[str, str]:
  """flax's `checkpoints.convert_pre_linen` on flat names -> {new name: old name}.

  Pre-linen flax numbered a module's auto-named children together (LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3: the original ViT .npz files);
  linen numbers them per type (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0). Identity on names that are already linen-style.
  """
  keys = list(keys)
  children: dict[str, set[str]] = {}  # parent path -> child names
  for key in keys:
    parts = key.split(SEP)
    for i in range(len(parts)):
      children.setdefault(SEP.join(parts[:i]), set()).add(parts[i])
  rename: dict[tuple[str, str], str] = {}
  for parent, names in children.items():
    by_type: dict[str, list[tuple[int, str]]] = {}
    for name in names:
      typ, _, num = name.rpartition("_")
      if typ and num.isdigit():
        by_type.setdefault(typ, []).append((int(num), name))
    for typ, numbered in by_type.items():
      for i, (_, name) in enumerate(sorted(numbered)):
        rename[parent, name] = f"{typ}_{i}"
  out = {}
  for key in keys:
    parts = key.split(SEP)
    new = [rename.get((SEP.join(parts[:i]), p), p) for i, p in enumerate(parts)]
    out[SEP.join(new)] = key
  return out


# ----------------------------------------------------------------------------- positions
def square_grid(n: int, what: str = "position table") -> tuple[int, int]:
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise CheckpointError(f"{what} has {n} entries, not a square grid; pass grid=(h, w)")
  return side, side


def resample_posemb(posemb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """big_vision's `resample_posemb`: a square table [1, g*g, D] (or [g*g, D]) resized with
  linear interpolation (scipy.ndimage.zoom, order=1, corners aligned) to [1, h*w, D]."""
  posemb = np.asarray(posemb, np.float32)
  table = posemb.reshape(-1, posemb.shape[-1])
  gs = square_grid(table.shape[0], "the checkpoint's position table")
  h, w = grid
  if gs == (h, w):
    return table[None]
  logging.info("resampling position embeddings from grid %s to %s", gs, (h, w))
  out = scipy.ndimage.zoom(table.reshape(*gs, -1), (h / gs[0], w / gs[1], 1), order=1)
  if out.shape[:2] != (h, w):  # zoom rounds its output size; never expected to differ
    raise CheckpointError(f"resampling a {gs} position grid to {(h, w)} gave {out.shape[:2]}")
  return out.reshape(1, h * w, -1)


# ----------------------------------------------------------------------------- matching
def assign(converted: Converted, template: Mapping, *, fresh: Mapping[str, str] | None = None,
           strict: bool = True) -> Any:
  """Builds params shaped like `template` from `converted`.

  fresh: our names that the checkpoint cannot provide by design, name -> reason; they keep the
    template's (initialised) value. Any other template parameter without a value -> error
    listing the missing names. Checkpoint keys neither taken nor ignored by the loader are
    unused: an error listing them when `strict`, else a warning. Values are cast to the
    template's dtype and returned as numpy arrays; flax boxes (LogicallyPartitioned) in the
    template are kept, with the new values inside; an outer {'params': ...} is kept.
  """
  source, fresh = converted.source, dict(fresh or {})
  tflat = flatten(_params_of(template))
  missing = [k for k in tflat if k not in converted.values and k not in fresh]
  if missing:
    raise CheckpointError(f"{len(missing)} parameter(s) of the model are missing from "
                          f"{source.path}: {_names(missing)}")
  unused = source.remaining()
  if unused:
    msg = f"{len(unused)} key(s) of {source.path} are not used by this model: {_names(unused)}"
    hints = sorted({source.hints[k] for k in unused if k in source.hints})
    if hints:
      msg += " -- " + "; ".join(hints)
    if strict:
      raise CheckpointError(msg + " (pass strict=False to load anyway)")
    logging.warning("%s", msg)
  reasons: dict[str, list[str]] = {}
  for key, why in source.ignored.items():
    reasons.setdefault(why, []).append(key)
  for why, keys in reasons.items():
    logging.info("%s: %d key(s) ignored by design (%s): %s", source.path, len(keys), why,
                 _names(keys))
  out = {}
  for name, leaf in tflat.items():
    if name in converted.values:
      value = np.asarray(converted.values[name][0]).astype(_unbox(leaf).dtype)
      out[name] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
    else:
      if not isinstance(_unbox(leaf), jax.ShapeDtypeStruct):
        out[name] = leaf
      else:
        raise CheckpointError(f"parameter {name!r} is initialised fresh ({fresh[name]}) but the "
                              f"template holds no value for it (pass initialised params, not "
                              f"shapes)")
      logging.info("%s: %s initialised fresh (%s)", source.path, name, fresh[name])
  logging.info("loaded %d parameter(s) from %s", len(converted.values), source.path)
  tree = unflatten(out)
  return {"params": tree} if set(template) == {"params"} else tree
