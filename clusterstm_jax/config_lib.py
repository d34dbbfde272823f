"""Config helpers: `arg` knob parsing, durations -> steps, and validation.

Configs are ml_collections `.py` files with `get_config(arg)`; `arg` is a comma-separated list of
knobs, e.g. `configs/pretrain.py:paper`, `configs/pretrain.py:smoke,variant=S/16`. Knobs are parsed
once here, with typed defaults, so every config reads them the same way (big_vision's idiom).
"""
from __future__ import annotations

import ast
import json
import math
from typing import Any

import ml_collections

from clusterstm_jax.errors import UserError


class ConfigError(UserError):
  """A config problem that the user can fix; printed as one line by the entry points."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"smoke,variant=B/16,steps=10"` against typed defaults.

  A bare word sets a bool knob to True. A value is converted to the type of its default. An unknown
  knob is an error, so a typo in `--config=x.py:smok` does not silently run the full config.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition('=')
    if key not in defaults:
      raise ConfigError(f'unknown config arg {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(f'config arg {key!r} needs a value ({key}=...)')
      out[key] = True
      continue
    out[key] = _convert(key, value, default)
  return out


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ('1', 'true', 'yes'):
      return True
    if value.lower() in ('0', 'false', 'no'):
      return False
    raise ConfigError(f'config arg {key!r}: {value!r} is not a bool')
  if isinstance(default, (int, float)):
    try:
      return type(default)(ast.literal_eval(value))
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f'config arg {key!r}: {value!r} is not a {type(default).__name__}') from e
  return value


def steps(prefix: str, config: ml_collections.ConfigDict, *, data_size: int | None,
          batch_size: int, default: int | None = None) -> int:
  """Turns exactly one of `{prefix}_steps`, `{prefix}_epochs`, `{prefix}_examples` into steps."""
  given = {}
  for suffix in ('steps', 'epochs', 'examples'):
    value = _duration(config, prefix, suffix)
    if value is not None:
      given[suffix] = value
  if len(given) > 1:
    raise ConfigError(f'give exactly one of {prefix}_steps/_epochs/_examples, got {sorted(given)}')
  if not given:
    if default is None:
      raise ConfigError(f'give one of {prefix}_steps, {prefix}_epochs or {prefix}_examples')
    return default
  (suffix, value), = given.items()
  if suffix == 'steps':
    return int(value)
  if suffix == 'epochs':
    if not data_size:
      raise ConfigError(f'{prefix}_epochs needs a dataset of known size')
    value = value * data_size
  return int(math.ceil(value / batch_size))


def _duration(config: ml_collections.ConfigDict, prefix: str, suffix: str):
  """config.{prefix}_{suffix}, None when unset (-1 or absent); other negatives, and a zero
  total, are errors naming the field."""
  name = f'{prefix}_{suffix}'
  value = config.get(name)
  if value is None or value == -1:
    return None
  if isinstance(value, bool) or value < 0 or (value == 0 and prefix == 'total'):
    raise ConfigError(f'{name}={value!r} must be {">" if prefix == "total" else ">="} 0 '
                      '(or -1: unset)')
  return value


def image_every(config: ml_collections.ConfigDict) -> int:
  """k of the image stream (every k-th step is an image step), 0 when there is none."""
  images = config.get('images')
  return int(images.every) if images is not None else 0


def image_batch_size(config: ml_collections.ConfigDict) -> int:
  """The image stream's global batch size (images.batch_size; -1 = config.batch_size)."""
  size = config.images.batch_size
  return config.batch_size if size == -1 else size


def _validate_images(config: ml_collections.ConfigDict, num_devices: int,
                     process_count: int) -> None:
  images = config.get('images')
  if images is None:
    return
  every = images.every
  if isinstance(every, bool) or not isinstance(every, int) or every < 0 or every == 1:
    raise ConfigError(f'images.every={every!r} must be 0 (no image stream) or an int >= 2 '
                      '(every k-th step is an image step)')
  if not every:
    return
  ratio = images.get('mask_ratio', -1.0)
  if ratio != -1.0 and not 0.0 <= ratio < 1.0:
    raise ConfigError(f'images.mask_ratio={ratio!r} must be in [0, 1) (or -1: mask.ratio)')
  size = image_batch_size(config)
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ConfigError(f'images.batch_size={images.batch_size!r} must be a positive int '
                      '(or -1: batch_size)')
  for count, what in ((process_count, 'processes'),
                      (num_devices, 'data-parallel shards of the mesh')):
    if size % count:
      raise ConfigError(f'images.batch_size={size} is not divisible by the {count} {what}')
  if not images.name or not images.split:
    raise ConfigError(f'images.name={images.name!r} and images.split={images.split!r} must '
                      'name the image dataset and its split (e.g. cc3m, train)')


# Fields of every training config that must be ints >= 1 (0 would divide by zero or, for
# keep_checkpoints, delete each checkpoint right after writing it).
POSITIVE_INTS = ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                 'data.num_frames', 'data.image_size', 'model.vocab_multiple')


def _field(config: ml_collections.ConfigDict, path: str):
  node = config
  for name in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return None
    node = node[name]
  return node


def validate_fields(config: ml_collections.ConfigDict) -> None:
  """Single-field checks: positive ints, durations, keep_period, halt_at_step."""
  for prefix in ('total', 'warmup'):
    for suffix in ('steps', 'epochs', 'examples'):
      _duration(config, prefix, suffix)
  for path in POSITIVE_INTS:
    value = _field(config, path)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f'{path}={value!r} must be an int >= 1')
  keep_period = config.get('keep_period', 0)
  if isinstance(keep_period, bool) or not isinstance(keep_period, int) or keep_period < 0:
    raise ConfigError(f'keep_period={keep_period!r} must be an int >= 0 (0: off)')
  halt = config.get('halt_at_step', -1)
  if isinstance(halt, bool) or not isinstance(halt, int) or halt < -1:
    raise ConfigError(f'halt_at_step={halt!r} must be an int >= 0 (or -1: never)')


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """Checks single fields and cross-field constraints that would otherwise fail deep inside jit."""
  validate_fields(config)
  if config.batch_size % process_count:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by the '
                      f'{process_count} processes')
  if config.batch_size % num_devices:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by the '
                      f'{num_devices} data-parallel shards of the mesh')
  _validate_images(config, num_devices, process_count)
  micro = config.get('microbatches', 1)
  sizes = [('batch_size', config.batch_size)]
  if config.get('images') is not None and image_every(config):
    sizes.append(('images.batch_size', image_batch_size(config)))
  for name, size in sizes:
    if micro < 1 or size % (micro * num_devices):
      raise ConfigError(f'{name}={size} must split into microbatches={micro} micro-batches, '
                        f'each a multiple of the {num_devices} data-parallel shards')
  mask = config.get('mask')
  if mask is not None and not 0.0 <= mask.ratio < 1.0:
    raise ConfigError(f'mask.ratio={mask.ratio} must be in [0, 1)')
  # lazy: config_lib imports no jax (tools set XLA_FLAGS after loading configs)
  from clusterstm_jax.models import common
  image_size = config.data.image_size
  try:
    _, patch = common.parse_variant(config.model.vision_variant)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if patch is None:
    raise ConfigError(f'model.vision_variant={config.model.vision_variant!r} needs a patch size, '
                      'e.g. "B/16"')
  try:
    common.policy(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if image_size % patch:
    raise ConfigError(f'data.image_size={image_size} is not a multiple of model.patch_size={patch}')


def flat_fields(config: ml_collections.ConfigDict, exclude=()) -> dict[str, Any]:
  """The config as {dotted name: JSON value}, without the names in `exclude` (the fingerprint
  of a run: tools/ablate.py, program_cache.py)."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(f'{prefix}{k}.', v)
      elif prefix + k not in exclude:
        out[prefix + k] = v
  walk('', json.loads(config.to_json_best_effort(sort_keys=True)))
  return out


def with_overrides(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-path fields set, e.g. with_overrides(c, **{'mask.ratio': 0.})."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for path, value in overrides.items():
      node = config
      *parents, leaf = path.split('.')
      for name in parents:
        node = node[name]
      node[leaf] = value
  return config


def resolve_config_spec(spec: str) -> str:
  """`configs/x.py[:arg]`: the path as given when it exists from here, else the same file of
  the installed `configs` package (pip install .), so configs are found from any directory."""
  import importlib.util
  import os
  path, sep, arg = spec.partition(':')
  if os.path.exists(path) or not path.endswith('.py'):
    return spec
  package = importlib.util.find_spec('configs')
  if package is None or not package.submodule_search_locations:
    return spec
  parts = os.path.normpath(path).split(os.sep)
  rel = os.path.join(*parts[parts.index('configs') + 1:]) if 'configs' in parts else parts[-1]
  for root in package.submodule_search_locations:
    if os.path.isfile(os.path.join(root, rel)):
      return os.path.join(root, rel) + sep + arg
  return spec


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way --config does (used for nested runs: the teacher)."""
  import importlib.util
  import os
  path, _, arg = resolve_config_spec(spec).partition(':')
  if not os.path.exists(path):
    raise ConfigError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(
      'config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  return config
