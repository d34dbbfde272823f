"""Timing helpers of tools/benchmark.py: blocking no-argument runners and how they are timed."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def load_average() -> str:
  """The 1/5/15-minute load averages, as printed beside every benchmark."""
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def spread(values) -> dict[str, float]:
  return dict(min=min(values), median=statistics.median(values), max=max(values))


def time_interleaved(fns: dict[str, Callable[[], float | None]], repeats: int, *,
                     warmup: int = 2, rewarm: bool = True) -> dict[str, dict]:
  """Seconds of each no-argument blocking program: {name: min, median, max, all}.

  Every program is warmed the same way: `warmup` untimed calls each (compile, caches), then
  `repeats` rounds, each calling every program once, the order rotating by one per round so
  no program always follows the same one; with `rewarm` every timed call is preceded by one
  untimed call of the same program (right after a multi-second step, the first call of
  another program runs up to ~2x slower: measured on masking, 209 ms against 110 ms alone).
  A program may return its own seconds as a float (e.g. a block of steps after its own warm-up
  steps); otherwise (None, or any other value) its call is timed. `all[i]` is round i's figure, so ratios can be taken per round.
  """
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      fns[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      if rewarm:
        fns[name]()
      t = time.perf_counter()
      own = fns[name]()
      # Only a float is a program's own figure: a returned array (a blocking call's result)
      # is not seconds.
      times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
  return {name: dict(spread(v), all=v) for name, v in times.items()}


def ratio(times: dict[str, dict], num: str, den: str) -> dict[str, float]:
  """min / median / max over rounds of times[num] / times[den] (paired: same round)."""
  return spread([a / b for a, b in zip(times[num]['all'], times[den]['all'])])


def fmt(s: dict[str, float], scale: float = 1e3, digits: int = 1) -> str:
  """'median (min - max)' of a spread dict, each value times `scale`."""
  return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f} - "
          f"{s['max'] * scale:.{digits}f})")


def block_runner(call: Callable[[], None], timed: int, warm: int) -> Callable[[], float]:
  """A program of `warm` untimed then `timed` timed calls of `call`; returns seconds per timed
  call (the steady state of a step fed by a prefetching loader, whose queue filled while the
  other programs ran: the warm calls drain it)."""
  def run():
    for _ in range(warm):
      call()
    t = time.perf_counter()
    for _ in range(timed):
      call()
    return (time.perf_counter() - t) / timed
  return run


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


def step_runner(trainer, batch=None, batches=None) -> Callable[[], None]:
  """A no-argument callable doing one (blocking) train step on `batch`, or on the next batch of
  the iterator `batches` (the loader runs as in a training run); the state lives in the closure."""
  state = [trainer.init_state(jax.random.key(0))]
  key = jax.random.key(1)

  def run():
    state[0], metrics = trainer.train_step(state[0], batch if batches is None else next(batches),
                                           key)
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
