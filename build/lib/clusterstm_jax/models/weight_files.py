"""Reading weight files: big_vision `.npz` and Hugging Face safetensors (a file, a model
directory or a sharded directory) into {name: numpy array}, and transformers' `config.json`.
No torch: safetensors are read through `safetensors.numpy`; bfloat16 through ml_dtypes."""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded: unreadable, or not matching the model."""


def check_file(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")


def _fix_dtype(arr: np.ndarray) -> np.ndarray:
  # np.save writes bfloat16 as 2-byte void (big_vision's recover_dtype); compute in float32.
  if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
    arr = arr.view(ml_dtypes.bfloat16)
  if arr.dtype in (ml_dtypes.bfloat16, np.float16):
    arr = arr.astype(np.float32)
  return arr


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` (np.savez / big_vision's npsave), read eagerly so that a
  truncated or corrupt member fails here, naming the file."""
  path = os.fspath(path)
  check_file(path)
  try:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
      raise CheckpointError(f"{path} holds a single array, not a checkpoint of named arrays")
    with loaded as npz:
      return {k: _fix_dtype(np.asarray(npz[k])) for k in npz.files}
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt .npz?): "
                          f"{type(e).__name__}: {e}") from e


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    try:
      arrays = safetensors.numpy.load_file(path)
    except TypeError:
      # numpy has no bfloat16: decode the raw bytes with ml_dtypes instead.
      with open(path, "rb") as f:
        raw = safetensors.deserialize(f.read())
      types = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
               "F64": np.float64, "I64": np.int64, "I32": np.int32}
      arrays = {}
      for name, view in raw:
        if view["dtype"] not in types:
          raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {view['dtype']}")
        arrays[name] = np.frombuffer(view["data"], types[view["dtype"]]).reshape(view["shape"])
  except CheckpointError:
    raise
  except Exception as e:  # SafetensorError derives from Exception only.
    raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt safetensors?): "
                          f"{type(e).__name__}: {e}") from e
  return {k: _fix_dtype(np.asarray(v)) for k, v in arrays.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A `.safetensors` file, or a transformers model directory holding `model.safetensors` or a
  sharded `model.safetensors.index.json`."""
  path = os.fspath(path)
  check_file(path)
  if not os.path.isdir(path):
    return _read_safetensors_file(path)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return _read_safetensors_file(single)
  if os.path.exists(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"cannot read shard index {index}: {e}") from e
    arrays = {}
    for shard in shards:
      arrays.update(_read_safetensors_file(os.path.join(path, shard)))
    return arrays
  raise CheckpointError(f"{path} is a directory without model.safetensors or "
                        f"model.safetensors.index.json (PyTorch .bin files are not supported)")


def read_hf_config(path: str | os.PathLike) -> dict | None:
  """The transformers `config.json` beside a safetensors checkpoint (or in its directory)."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  cfg = os.path.join(directory, "config.json")
  if not os.path.exists(cfg):
    return None
  try:
    with open(cfg) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f"cannot parse {cfg}: {e}") from e
