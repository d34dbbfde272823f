"""Timing helpers of tools/benchmark.py: blocking no-argument runners and how they are timed."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int,
                     rewarm: tuple[str, ...] = ()) -> dict[str, dict]:
  """Median, min and max seconds of each no-argument blocking callable. After two untimed calls
  each (compile, warm-up), the timed calls go round-robin so load changes hit all alike.
  The short calls named in `rewarm` get one untimed call before each timed one: right after a
  multi-second step the first call runs ~2x slower (measured: masking 209 ms interleaved, 110 ms
  alone), which is not what the same work costs inside a running step."""
  for fn in fns.values():
    fn()
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      if name in rewarm:
        fn()
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: dict(median=statistics.median(v), min=min(v), max=max(v))
          for name, v in times.items()}


def time_ms(fn, *args, repeats: int) -> tuple[float, float]:
  """(median, min) wall milliseconds of compiled calls of `fn(*args)` after one untimed call
  (compile + warm-up); min is the steadier on a shared CPU."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def step_runner(trainer, batch) -> Callable[[], None]:
  """A no-argument callable doing one (blocking) train step; the state lives in the closure."""
  state = [trainer.init_state(jax.random.key(0))]
  key = jax.random.key(1)

  def run():
    state[0], metrics = trainer.train_step(state[0], batch, key)
    jax.block_until_ready((state[0], metrics))
  return run


def matmul_runner(n: int) -> Callable[[], None]:
  """A blocking call of a jitted n x n f32 matmul (2 n^3 FLOPs): the CPU's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  fn = jax.jit(lambda x, y: x @ y)
  return lambda: jax.block_until_ready(fn(a, b))


def cost_flops(lowered, compiled: bool) -> float:
  """FLOPs from XLA's cost analysis of a jax.stages.Lowered: of the compiled executable, or of
  the lowered module (no compilation: seconds instead of minutes for the paper step on CPU,
  and within 0.1% of the compiled figure there). Per device on a sharded mesh."""
  cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])
