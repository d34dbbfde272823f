r"""Benchmark of the masking strategies (prints figures; not a test).

  python -m clusterstm_jax.tools.bench_masking                      # both shapes below
  python -m clusterstm_jax.tools.bench_masking --batch=8 --repeats=20

Times the jitted, compiled masking (block_until_ready, median and min of --repeats runs) on random
teacher features, and prints milliseconds per call and per clip for:
  paper   T=4, N=196 (ViT-B/16 at 224 px), D=768, ratio 0.85 -> N_c=29;
  shapes  T=4, N=64 (64 px, patch 8), D=--shapes_dim, ratio 0.85 -> N_c=10 (the default config).
Also times the parts of 'clusterstm' (DPC alone; the temporal density with the per-frame
distances it shares with DPC) to show where the time goes.
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from clusterstm_jax.masking import density as density_lib
from clusterstm_jax.masking import dpc as dpc_lib
from clusterstm_jax.masking import strategies

_BATCH = flags.DEFINE_integer('batch', 8, 'clips per call')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'timed calls (median and min reported)')
_SHAPES_DIM = flags.DEFINE_integer('shapes_dim', 64, 'teacher width for the "shapes" setting')
_RATIO = flags.DEFINE_float('ratio', 0.85, 'masking ratio')


def _time_ms(fn, *args, repeats):
  """(median, min) wall milliseconds of compiled calls; min is the steadier on a shared CPU."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def bench(name, b, t, n, d, ratio, repeats):
  nc = strategies.num_keep(n, ratio)
  key = jax.random.key(0)
  features = jax.random.normal(key, (b, t, n, d), jnp.float32)
  print(f'\n[{name}] B={b} T={t} N={n} D={d} ratio={ratio} N_c={nc}  '
        f'({jax.devices()[0].platform}, {jax.device_count()} device(s))')
  print(f'  {"what":44s} {"ms/call":>9s} {"ms/clip":>9s} {"min ms/clip":>12s}')
  rows = []
  for strategy in strategies.STRATEGIES:
    for normalize in ((True, False) if strategy == 'clusterstm' else (True,)):
      fn = jax.jit(lambda f, r, s=strategy, nz=normalize: strategies.compute_mask(
          s, r, shape=(b, t, n), num_keep=nc, features=f, normalize=nz))
      label = strategy + ('' if normalize else ' (normalize=False)')
      rows.append((label, _time_ms(fn, features, key, repeats=repeats)))
  dpc_fn = jax.jit(lambda f: dpc_lib.dpc_knn(f, nc, k=5, normalize=True))
  rows.append(('  part: DPC-KNN alone (own per-frame GEMM)', _time_ms(dpc_fn, features,
                                                                     repeats=repeats)))
  dens_fn = jax.jit(lambda f: density_lib.temporal_log_density_and_sq_dists(f))
  rows.append(('  part: temporal density + frame distances', _time_ms(dens_fn, features,
                                                                     repeats=repeats)))
  for label, (med, low) in rows:
    print(f'  {label:44s} {med:9.2f} {med / b:9.3f} {low / b:12.3f}')


def main(argv):
  del argv
  bench('paper', _BATCH.value, 4, 196, 768, _RATIO.value, _REPEATS.value)
  bench('shapes', _BATCH.value, 4, 64, _SHAPES_DIM.value, _RATIO.value, _REPEATS.value)


if __name__ == '__main__':
  app.run(main)
