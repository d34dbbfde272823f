"""Lowered step programs kept on disk, so that a relaunch skips tracing and lowering.

jax's persistent compilation cache (compile_cache.py) saves XLA's compile, but every start
still traces the step in Python and lowers it to StableHLO before it can look the executable
up: for the default step here that is 2.4 s + 0.6 s, more than the cache read itself. A
`ProgramCache` keeps the lowered program, serialised with `jax.export` (a flatbuffer: no
pickle), in DIR/NAME-KEY.exported (+ NAME-KEY.json, its output layout). The first start exports
the step (one trace and lowering, as jit does) and compiles it; a relaunch deserialises it,
compiles it (a hit in the compilation cache: the same module) and never traces.

KEY hashes everything that decides the traced program: the package's own source, the library
versions, the jax options that change tracing, the caller's fingerprint of the step (config
less its loop-only fields, the schedule's step counts, tokenizer ids, the models' fields) and
the shapes, dtypes and shardings of the arguments. A missing or unreadable file is traced
again (and rewritten); files are written to a temporary name and renamed, so a reader never
sees half of one. Only steps of the form (state, ...) -> (state, {name: array}) are kept; the
state is donated as in the jitted step. A step that cannot be exported runs uncached (a warning).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from typing import Any, Callable

import flax
import jax
import jaxlib
import optax
from absl import logging
from etils import epath

from clusterstm_jax import config_lib

SUFFIX = '.exported'
# Config fields that never reach a step program: changing them must not re-trace.
# (The seed reaches a step only through its arguments: the state and the base key.)
LOOP_ONLY_FIELDS = ('halt_at_step', 'resume', 'compile_cache', 'seed', 'log_every_steps',
                    'checkpoint_every_steps', 'eval_every_steps', 'eval_batch_size',
                    'keep_checkpoints', 'keep_period', 'async_checkpointing', 'data.prefetch',
                    'data.worker_count', 'data.worker_buffer_size', 'data.read_threads',
                    'data.read_buffer_size', 'data.data_dir')
# jax options that change what tracing produces.
_TRACE_OPTIONS = ('jax_enable_x64', 'jax_default_matmul_precision', 'jax_numpy_rank_promotion',
                  'jax_numpy_dtype_promotion', 'jax_default_prng_impl')
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
  """sha256 of every .py file of the package (paths and contents)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(_PACKAGE_DIR):
    dirs.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(root, name)
        h.update(os.path.relpath(path, _PACKAGE_DIR).encode())
        with open(path, 'rb') as f:
          h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def _versions() -> dict:
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'optax': optax.__version__}


def config_fingerprint(config) -> dict:
  """The config as a flat {dotted name: value} without LOOP_ONLY_FIELDS."""
  return config_lib.flat_fields(config, LOOP_ONLY_FIELDS)


def stable_repr(obj) -> str:
  """repr without memory addresses (function and object reprs carry them)."""
  return re.sub(r' at 0x[0-9a-fA-F]+', '', repr(obj))


def _sharding_key(x):
  """x's sharding, with equivalent NamedSharding specs (P() and P(None, None)) made equal."""
  s = getattr(x, 'sharding', None)
  if isinstance(s, jax.sharding.NamedSharding):
    spec = tuple(s.spec)
    while spec and spec[-1] is None:
      spec = spec[:-1]
    return ('named', s.mesh, spec, s.memory_kind)
  return s


def _signature(leaves) -> list:
  return [[list(x.shape), str(x.dtype), stable_repr(_sharding_key(x))] for x in leaves]


def _placement(x):
  """The sharding a leaf is given to the program: a one-device array (a fresh key, a host
  array) goes wherever the jitted step puts it."""
  s = getattr(x, 'sharding', None)
  return None if isinstance(s, jax.sharding.SingleDeviceSharding) else s


class ProgramCache:
  """Exported step programs in `directory` (a local path or gs://), keyed as described above.

  `fingerprint`: JSON-able facts of the caller that decide the traced program beyond the
  arguments' shapes (config_fingerprint(config), step counts, ...)."""

  def __init__(self, directory: str, fingerprint: dict):
    self.directory = epath.Path(directory)
    self.fingerprint = fingerprint

  def key(self, name: str, leaves) -> str:
    facts = {'name': name, 'source': source_hash(), 'versions': _versions(),
             'options': {o: str(getattr(jax.config, o, None)) for o in _TRACE_OPTIONS},
             'backend': jax.default_backend(), 'devices': jax.device_count(),
             'caller': self.fingerprint, 'args': _signature(leaves)}
    text = json.dumps(facts, sort_keys=True, default=stable_repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]

  def wrap(self, name: str, jitted: Callable, *, under: Callable = lambda f: f) -> Callable:
    """(state, *rest) -> (state, metrics) like `jitted` (a jax.jit of such a step that
    donates its state), served from this cache. `under` wraps each call (e.g. a mesh context)."""
    # (treedef, leaf shapes, dtypes, shardings) -> (jitted call of the program or None,
    # metric names, the state's treedef)
    programs: dict = {}

    def step(state, *rest):
      leaves, treedef = jax.tree.flatten((state, *rest))
      sig = (treedef, tuple((x.shape, x.dtype, _sharding_key(x)) for x in leaves))
      if sig not in programs:
        key = self.key(name, leaves)
        programs[sig] = (*under(lambda: self._load_or_export(name, key, jitted, treedef,
                                                             leaves))(), jax.tree.structure(state))
      call, metric_names, state_treedef = programs[sig]
      if call is None:  # this program could not be exported: the jitted step, as without cache
        return under(lambda: jitted(state, *rest))()
      out = under(lambda: call(*leaves))()
      n = state_treedef.num_leaves
      return (jax.tree.unflatten(state_treedef, out[:n]), dict(zip(metric_names, out[n:])))

    return step

  def _paths(self, name: str, key: str):
    stem = self.directory / f'{name}-{key}'
    return stem.with_suffix(SUFFIX), stem.with_suffix('.json')

  def _load_or_export(self, name, key, jitted, treedef, leaves):
    path, meta_path = self._paths(name, key)
    num_state = jax.tree.structure(treedef.unflatten(leaves)[0]).num_leaves
    exported = metric_names = None
    if path.exists():
      try:
        metric_names = json.loads(meta_path.read_text())['metrics']
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        logging.info('step program %s read from %s (no tracing)', name, path)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('step program %s at %s is unreadable (%s): tracing it again', name,
                        path, e)
        exported = None
    if exported is None:
      try:
        exported, metric_names = self._export(jitted, treedef, leaves, num_state)
      except Exception as e:  # pylint: disable=broad-except
        # The cache only saves time: a program jax.export cannot serialise (e.g. a custom call
        # without a stability guarantee) runs as the plain jitted step, traced on every start.
        logging.warning('step program %s cannot be exported (%s: %s): running it uncached', name,
                        type(e).__name__, e)
        return None, None
      self._write(path, meta_path, exported, metric_names)
    # The new state keeps the shardings of the state given, so the next step finds this
    # program again; metrics are replicated.
    placements = [_placement(x) for x in leaves]
    meshes = [p.mesh for p in placements if isinstance(p, jax.sharding.NamedSharding)]
    repl = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec()) if meshes else None
    call = jax.jit(exported.call, in_shardings=tuple(placements),
                   out_shardings=(*placements[:num_state], *([repl] * len(metric_names))),
                   donate_argnums=tuple(range(num_state)))
    return call, metric_names

  @staticmethod
  def _export(jitted, treedef, leaves, num_state):
    names = []

    def flat(*xs):
      state, metrics = jitted(*jax.tree.unflatten(treedef, xs))
      if not isinstance(metrics, dict) or any(isinstance(v, (dict, list, tuple))
                                              for v in metrics.values()):
        raise TypeError('a cached step program must return (state, {name: array})')
      state_leaves = jax.tree.leaves(state)
      if len(state_leaves) != num_state:
        raise TypeError('a cached step program must return a state shaped like its input')
      names[:] = list(metrics)
      return (*state_leaves, *(metrics[k] for k in names))

    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_placement(x)) for x in leaves]
    exported = jax.export.export(jax.jit(flat))(*abstract)
    return exported, list(names)

  def _write(self, path, meta_path, exported, metric_names) -> None:
    if jax.process_index() != 0:
      return  # every process traces the same program; one writes it
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      for p, data in ((meta_path, json.dumps({'metrics': metric_names}).encode()),
                      (path, bytes(exported.serialize()))):
        tmp = p.parent / f'.{p.name}.{uuid.uuid4().hex}.tmp'
        tmp.write_bytes(data)
        tmp.replace(p)  # the program last: its presence means both files are whole
    except OSError as e:  # a read-only cache costs a trace next time, nothing else
      logging.warning('could not write step program %s: %s', path, e)


def wrap_all(cache: ProgramCache | None, steps: dict[str, Any], under) -> dict[str, Any]:
  """{name: jitted step or None} -> {name: cached step or None}; no cache: unchanged."""
  if cache is None:
    return steps
  return {k: None if f is None else cache.wrap(k, f, under=under) for k, f in steps.items()}
