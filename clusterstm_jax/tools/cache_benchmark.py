r"""Live vs offline-cached teacher (tools/teacher_cache.py), measured in one run:

  python -m clusterstm_jax.tools.cache_benchmark --config=configs/pretrain.py [--steps=10] \
      [--pass_examples=256] [--flops_config=configs/pretrain.py:paper --flops_batch=8]

  step   the default train step with the live teacher and with the cache (the cached batch
         carries the same batch's teacher fields), interleaved (tools/timing.py), min / median /
         max of --steps calls each, their ratio, and the load average at start and end;
  pass   the teacher pass's seconds per clip-view (JPEG decode + teacher + writing, K = 1) over
         --pass_examples training examples, after one warm-up batch (compile);
  flops  XLA cost-analysis FLOPs of the live, cached and unmasked steps at --flops_config
         (lowered on abstract inputs) and the ratio unmasked / cached (--flops_config='': none).
A missing teacher export is replaced by random weights of its architecture: the same time and
FLOPs (it says which). The flags of tools/benchmark.py apply (--config, --steps, --flops_*).
"""
from __future__ import annotations

import os

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.tools import benchmark
from clusterstm_jax.tools import teacher_cache as cache_tool
from clusterstm_jax.tools import timing

FLAGS = flags.FLAGS
flags.DEFINE_integer('pass_examples', 256, 'Examples of the timed teacher pass (K = 1).')


def _row(name: str, value: float, unit: str = '') -> None:
  print(f'{name:>44s}: {value:12.4g} {unit}')


def bench_cache(config) -> None:
  """Live vs offline-cached teacher (tools/teacher_cache.py): the two steps interleaved on
  one real batch (the cached batch carries that batch's teacher fields), the pass's cost, and
  the --flops_config FLOP ratio unmasked / cached. A missing teacher export is replaced by
  random weights of its architecture (same time and FLOPs)."""
  load = os.getloadavg()[0]
  tokenizer = pipeline.get_tokenizer(config.data)
  mesh = sharding_lib.make_mesh(config.mesh)
  text = tasks_lib.TextSpec.from_tokenizer(tokenizer)
  teacher, how = cache_tool.bench_teacher(config, mesh, text.vocab_size, tokenizer)
  host = benchmark.host_batch(config, tokenizer, teacher)
  cached_batch = sharding_lib.global_batch(cache_tool.with_signals(config, teacher, host), mesh)
  live = benchmark.make_trainer(config, mesh, text, teacher)
  cached = benchmark.make_trainer(cache_tool.cached_config(config), mesh, text, None)
  fns = {'live': timing.step_runner(live, sharding_lib.global_batch(host, mesh)),
         'cached': timing.step_runner(cached, cached_batch)}
  times = timing.time_interleaved(fns, FLAGS.steps)
  print(f'\n[cache] live vs cached teacher ({how} teacher), {FLAGS.steps} interleaved steps '
        f'each, batch {config.batch_size}; load average {load:.2f} at start')
  for name, t in times.items():
    _row(f'{name} step ms min / median / max',
         1e3 * t['median'], f"ms ({1e3 * t['min']:.1f} / {1e3 * t['median']:.1f} / "
         f"{1e3 * t['max']:.1f})")
  _row('live / cached step time (medians)', times['live']['median'] / times['cached']['median'],
       f"x (mins {times['live']['min'] / times['cached']['min']:.2f}x; expect >= 1.3x)")
  source = pipeline.train_source(config.data, announce=False)
  stats = cache_tool.time_pass(config, teacher, source, tokenizer, FLAGS.pass_examples,
                               config.batch_size)
  _row(f'pass: {stats["clip_views"]} clip-views', stats['seconds'], 's')
  _row('pass per clip-view', 1e3 * stats['seconds_per_clip_view'], 'ms (decode + teacher)')
  if FLAGS.flops_config:
    flops_ratio()
  print(f'  load average {os.getloadavg()[0]:.2f} at end')


def flops_ratio() -> None:
  """The FLOPs of --flops_config's live, cached and unmasked steps (its teacher.model is the
  teacher's architecture, as in :paper)."""
  pconfig = config_lib.load_config_file(FLAGS.flops_config)
  pmesh = sharding_lib.make_mesh(pconfig.mesh)
  ptext = tasks_lib.TextSpec(pconfig.teacher.model.vocab_size)
  b, compiled = FLAGS.flops_batch, FLAGS.flops_compiled
  configs = {'live': (pconfig, teacher_lib.abstract_teacher(pconfig, pmesh)),
             'cached': (cache_tool.cached_config(pconfig), None),
             'unmasked': (benchmark.unmasked_config(pconfig), None)}
  f = {name: benchmark.step_flops(c, pmesh, ptext, t, b, compiled)
       for name, (c, t) in configs.items()}
  print(f'  {FLAGS.flops_config} FLOPs at batch {b} (XLA cost analysis, per device):')
  for name, v in f.items():
    _row(f'{name} step', v / 1e9, 'GFLOP')
  _row('unmasked / cached FLOPs', f['unmasked'] / f['cached'], 'x (expect ~2.9x)')
  _row('unmasked / live FLOPs', f['unmasked'] / f['live'], 'x')


def main() -> None:
  bench_cache(FLAGS.config)


if __name__ == '__main__':
  cli.run(main)
