"""What every evaluator gets: a `Context` with the params, the task's prediction functions
(big_vision's predict_fns: pure functions of (params, arrays), never the model or the trainer),
the loader's per-example decode, the tokenizer and the mesh; and the helpers to run them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict  # the run's config (data, model sizes, task settings)
  params: Any
  predict_fns: dict[str, Callable]   # tasks.Task.predict_fns
  decode: Callable                   # the loader's per-example decode (tasks.Task.decode)
  tokenizer: Any
  mesh: jax.sharding.Mesh

  def jit(self, fn: Callable, **kwargs) -> Callable:
    """jax.jit(fn) with a replicated output, traced and run under the mesh and axis rules."""
    rules = sharding_lib.logical_rules(self.config.sharding_rules)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      jitted = jax.jit(fn, out_shardings=sharding_lib.replicated(self.mesh), **kwargs)

    def call(*args, **kw):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
        return jitted(*args, **kw)
    return call

  def loader(self, ev, examples: str = 'records'):
    """The eval loader of evaluator config `ev` (split, batch_size); `examples` as in
    pipeline.make_eval_loader."""
    shards = sharding_lib.batch_size_per_shard(self.mesh)
    if ev.batch_size % shards:
      raise UserError(f'eval batch_size={ev.batch_size} is not a multiple of the {shards} '
                      'data-parallel shards')
    return pipeline.make_eval_loader(
        self.config.data, self.tokenizer, split=ev.split or None, global_batch_size=ev.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), decode=self.decode,
        examples=examples)

  def needs(self, *names: str, what: str, tasks: str) -> None:
    """A UserError unless the model has the prediction functions `names` (of task `tasks`)."""
    if any(n not in self.predict_fns for n in names):
      raise UserError(f'{what} evaluation needs a model of task {tasks}; this one is '
                      f'{self.config.get("task")!r}')


def global_rows(local: np.ndarray, mesh) -> np.ndarray:
  """Host values of a batch-sharded per-process column, gathered to the global batch."""
  del mesh
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def put(x: np.ndarray, sharding) -> jax.Array:
  """The same host array on every process -> one global array (multi-host safe)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
