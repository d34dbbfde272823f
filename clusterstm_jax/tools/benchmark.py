r"""Benchmarks that print figures (never timed tests): pipeline, step, masking, unmasked, FLOPs.

  python -m clusterstm_jax.tools.benchmark --config=configs/pretrain.py [--steps=20]
      [--what=pipeline,step,masking,unmasked,flops] [--config.teacher.workdir=DIR]

  pipeline  train-loader examples/s against the train step's (must keep up: >= 3x on default);
  step      the default train step (teacher -> masking -> student -> losses -> update);
  masking   the masking alone (clustering + density + selection; teacher excluded), jitted on
            the teacher's tokens of the default batch, as a percentage of the step (target
            <= 5%), and its time per clip at the paper's shape (T=4, N=196, D=768, N_c=29);
  unmasked  the same student with no masking (ratio 0, strategy random), no decoder, no MRM and
            so no teacher: its step time over the ClusterSTM step's (target >= 2.5x at r=0.85);
  flops     XLA cost-analysis FLOPs of the ClusterSTM and unmasked steps at --flops_config
            (the paper config; lowered on abstract inputs, no weights or data), their ratio,
            the teacher's share, the same pair without VTM/MLM (--flops_breakdown), and the
            default step's achieved FLOP/s against a jitted f32 matmul's on this CPU.
            The analysis is of the lowered module by default (--flops_compiled for the
            compiled one: 4+ minutes per paper-scale step on 2 CPU cores, same FLOPs to 0.1%).

Everything is measured in this one run and the timed calls of the different functions are
interleaved, so the ratios hold even when the machine is noisy (median of --steps calls each).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from clusterstm_jax import config_lib  # no jax: safe before XLA flags are set

ALL = ('pipeline', 'step', 'masking', 'unmasked', 'flops')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/pretrain.py', 'Config.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed calls of each timed function (after compilation).')
flags.DEFINE_integer('batches', 30, 'Timed input batches.')
flags.DEFINE_list('what', list(ALL), f'Which benchmarks to run, a subset of {",".join(ALL)}.')
flags.DEFINE_string('flops_config', 'configs/pretrain.py:paper', 'Config of the FLOP ratio.')
flags.DEFINE_integer('flops_batch', 8, 'Batch the FLOP ratio is lowered with.')
flags.DEFINE_integer('paper_mask_batch', 8, 'Clips per call when timing the paper-shape masking.')
flags.DEFINE_integer('matmul_size', 2048, 'n of the n x n f32 matmul that measures peak FLOP/s.')
flags.DEFINE_bool('flops_compiled', False, 'Cost analysis of the compiled step (minutes on CPU at '
                  'the paper scale) instead of the lowered one (seconds, within 0.1%).')
flags.DEFINE_bool('flops_breakdown', True, 'Also the FLOPs without VTM/MLM (and MRM).')


def bench_pipeline(config, tokenizer, num_batches: int) -> float:
  from clusterstm_jax.data import pipeline
  loader = pipeline.make_train_loader(config.data, tokenizer, global_batch_size=config.batch_size,
                                      seed=0, process_index=0, process_count=1)
  it = iter(loader)
  next(it)  # start-up (worker processes, file handles) is not throughput
  t = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * config.batch_size / (time.perf_counter() - t)


def host_batch(config, tokenizer) -> dict[str, np.ndarray]:
  """One real batch of the train loader (real frames, captions and object labels)."""
  from clusterstm_jax.data import pipeline
  loader = pipeline.make_train_loader(config.data, tokenizer, global_batch_size=config.batch_size,
                                      seed=0, process_index=0, process_count=1)
  return next(iter(loader))


def make_trainer(config, mesh, text, teacher):
  from clusterstm_jax import step as step_lib
  return step_lib.build_trainer(config, text=text, mesh=mesh, total_steps=1000, warmup_steps=10,
                                teacher=teacher)


def step_runner(trainer, batch) -> Callable[[], None]:
  """A no-argument callable doing one (blocking) train step; the state lives in the closure."""
  import jax
  state = [trainer.init_state(jax.random.key(0))]
  key = jax.random.key(1)

  def run():
    state[0], metrics = trainer.train_step(state[0], batch, key)
    jax.block_until_ready((state[0], metrics))
  return run


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int,
                     rewarm: tuple[str, ...] = ()) -> dict[str, dict]:
  """Median and min seconds of each no-argument blocking callable. After two untimed calls
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
  return {name: dict(median=statistics.median(v), min=min(v)) for name, v in times.items()}


def masking_runners(config, teacher, batch) -> tuple[Callable, Callable, tuple]:
  """(mask_from_config jitted on the teacher tokens of `batch`, precomputed so the teacher is
  excluded; the teacher's forward alone; the tokens' shape), as blocking no-argument calls."""
  import jax
  from clusterstm_jax import step as step_lib
  from clusterstm_jax.masking import strategies as masking
  t, h, w = step_lib.grid(config)
  b = batch['video'].shape[0]
  teacher_fn = jax.jit(lambda p, v: teacher.frame_tokens(p, step_lib.normalize_video(v)))
  features = teacher_fn(teacher.params, batch['video'])
  fn = jax.jit(lambda f, k: masking.mask_from_config(config.mask, k, (b, t, h * w), f))
  key = jax.random.key(2)
  return (lambda: jax.block_until_ready(fn(features, key)),
          lambda: jax.block_until_ready(teacher_fn(teacher.params, batch['video'])),
          tuple(features.shape))


def paper_shape_masking(batch: int, repeats: int, ratio: float = 0.85) -> tuple[float, int]:
  """(median ms per clip, N_c) of 'clusterstm' masking at T=4, N=196, D=768 (random tokens)."""
  import jax
  from clusterstm_jax.masking import strategies as masking
  cfg = masking.default_mask_config()
  cfg.strategy, cfg.ratio = 'clusterstm', ratio
  shape = (batch, 4, 196)
  features = jax.random.normal(jax.random.key(0), (*shape, 768))
  fn = jax.jit(lambda f, k: masking.mask_from_config(cfg, k, shape, f))
  key = jax.random.key(1)
  t = time_interleaved({'m': lambda: jax.block_until_ready(fn(features, key))}, repeats)['m']
  return 1e3 * t['median'] / batch, masking.num_keep(196, ratio)


def unmasked_config(config):
  """The same student seeing every token: random 'masking' at ratio 0, no decoder, no MRM
  (so no teacher either). VTC, VTM and MLM are unchanged."""
  return config_lib.with_overrides(config, **{'mask.strategy': 'random', 'mask.ratio': 0.0,
                            'loss_weights.mrm': 0.0, 'model.decoder.out_dim': 0})


NO_TEXT_LOSSES = {'loss_weights.vtm': 0.0, 'loss_weights.mlm': 0.0}


def cost_flops(lowered, compiled: bool) -> float:
  """FLOPs from XLA's cost analysis of a jax.stages.Lowered: of the compiled executable, or of
  the lowered module (no compilation: seconds instead of minutes for the paper step on CPU,
  and within 0.1% of the compiled figure there). Per device on a sharded mesh."""
  cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def step_flops(config, mesh, text, teacher, batch_size: int, compiled: bool) -> float:
  trainer = make_trainer(config, mesh, text, teacher)
  return cost_flops(trainer.lower(batch_size), compiled)


def paper_flops(spec: str, batch_size: int, compiled: bool,
                breakdown: bool = True) -> dict[str, float]:
  """Step FLOPs of ClusterSTM and of the unmasked student at `spec` (abstract inputs only),
  the teacher's forward, and (breakdown) the same pair without the text-side losses."""
  import flax.linen as nn
  import jax
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  from clusterstm_jax import teacher as teacher_lib
  config = config_lib.load_config_file(spec)
  mesh = sharding_lib.make_mesh(config.mesh)
  text = step_lib.TextSpec(config.teacher.model.vocab_size)
  teacher = teacher_lib.abstract_teacher(config, mesh)
  unmasked = unmasked_config(config)
  out = {'clusterstm': step_flops(config, mesh, text, teacher, batch_size, compiled),
         'unmasked': step_flops(unmasked, mesh, text, None, batch_size, compiled)}
  # The teacher's forward on every frame (inside the ClusterSTM step).
  t, s = config.data.num_frames, config.data.image_size
  video = jax.ShapeDtypeStruct((batch_size, t, s, s, 3), np.float32,
                               sharding=sharding_lib.batch_sharding(mesh, 5))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(
      config.sharding_rules)):
    out['teacher_forward'] = cost_flops(jax.jit(teacher.frame_tokens).lower(teacher.params,
                                                                            video), compiled)
  if breakdown:
    override = config_lib.with_overrides
    out['clusterstm_video'] = step_flops(override(config, **NO_TEXT_LOSSES), mesh, text, teacher,
                                         batch_size, compiled)
    out['clusterstm_vtc'] = step_flops(
        override(config, **NO_TEXT_LOSSES, **{'loss_weights.mrm': 0.0,
                                              'model.decoder.out_dim': 0}),
        mesh, text, teacher, batch_size, compiled)
    out['unmasked_video'] = step_flops(override(unmasked, **NO_TEXT_LOSSES), mesh, text, None,
                                       batch_size, compiled)
  return out


def matmul_runner(n: int) -> Callable[[], None]:
  """A blocking call of a jitted n x n f32 matmul (2 n^3 FLOPs): the CPU's practical peak."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  fn = jax.jit(lambda x, y: x @ y)
  return lambda: jax.block_until_ready(fn(a, b))


def _row(name: str, value: float, unit: str = '') -> None:
  print(f'{name:>44s}: {value:12.4g} {unit}')


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, tfds) off
  import jax
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  from clusterstm_jax.data import pipeline
  what = [w.strip() for w in FLAGS.what if w.strip()]
  unknown = sorted(set(what) - set(ALL))
  if unknown:
    raise app.UsageError(f'unknown --what {unknown}; known: {",".join(ALL)}')
  config = FLAGS.config
  tokenizer = pipeline.get_tokenizer(config.data)
  print(f'{jax.device_count()} {jax.devices()[0].platform} device(s); config batch '
        f'{config.batch_size}, mask {config.mask.strategy} r={config.mask.ratio}')
  step_ms = None

  timed = set(what) & {'step', 'masking', 'unmasked', 'flops'}
  if timed:
    mesh = sharding_lib.make_mesh(config.mesh)
    text = step_lib.TextSpec.from_tokenizer(tokenizer)
    teacher = None
    if step_lib.needs_teacher(config):
      from clusterstm_jax import teacher as teacher_lib
      teacher = teacher_lib.load_teacher(config, mesh)
    batch = sharding_lib.global_batch(host_batch(config, tokenizer), mesh)
    trainer = make_trainer(config, mesh, text, teacher)
    fns = {'step': step_runner(trainer, batch)}
    if 'masking' in what:
      if teacher is None:
        raise app.UsageError(f'--what=masking needs a teacher; mask.strategy is '
                             f'{config.mask.strategy!r}')
      fns['masking'], fns['teacher'], feature_shape = masking_runners(config, teacher, batch)
    if 'unmasked' in what:
      fns['unmasked'] = step_runner(make_trainer(unmasked_config(config), mesh, text, None), batch)
    if 'flops' in what:  # timed with the step, so that both see the same machine load
      fns['matmul'] = matmul_runner(FLAGS.matmul_size)
    times = time_interleaved(fns, FLAGS.steps, rewarm=('masking', 'teacher', 'matmul'))
    step_ms = 1e3 * times['step']['median']
    print('\n[step] default train step')
    _row('step ms (median)', step_ms, 'ms')
    _row('step ms (min)', 1e3 * times['step']['min'], 'ms')
    _row('step examples/s', config.batch_size / times['step']['median'], 'ex/s')
    if 'masking' in what:
      mask_ms = 1e3 * times['masking']['median']
      print(f'\n[masking] mask_from_config alone on teacher tokens {feature_shape}')
      _row('masking ms (median)', mask_ms, 'ms')
      _row('masking / step', 100 * mask_ms / step_ms, '% (target <= 5%)')
      _row('for scale: teacher forward ms (median)', 1e3 * times['teacher']['median'], 'ms')
      _row('teacher forward / step', 100 * times['teacher']['median'] / times['step']['median'],
           '%')
      per_clip, nc = paper_shape_masking(FLAGS.paper_mask_batch, FLAGS.steps)
      _row(f'paper shape T=4 N=196 D=768 N_c={nc}, per clip', per_clip, 'ms/clip')
    if 'unmasked' in what:
      un_ms = 1e3 * times['unmasked']['median']
      print('\n[unmasked] same student, ratio 0, no decoder / MRM / teacher')
      _row('unmasked step ms (median)', un_ms, 'ms')
      _row('unmasked / ClusterSTM step time', un_ms / step_ms,
           f'x (target >= 2.5x at r={config.mask.ratio})')

  if 'pipeline' in what:
    rate = bench_pipeline(config, tokenizer, FLAGS.batches)
    print('\n[pipeline] train loader')
    _row('pipeline examples/s', rate, 'ex/s')
    if step_ms is not None:
      _row('pipeline / step', rate / (config.batch_size / (step_ms / 1e3)), 'x (target >= 3x)')

  if 'flops' in what:
    compiled = FLAGS.flops_compiled
    print(f'\n[flops] XLA cost analysis ({"compiled" if compiled else "lowered"}), '
          f'{FLAGS.flops_config} at batch {FLAGS.flops_batch} ({jax.device_count()} device(s); '
          'per device)')
    f = paper_flops(FLAGS.flops_config, FLAGS.flops_batch, compiled, FLAGS.flops_breakdown)
    g = {k: v / 1e9 for k, v in f.items()}
    _row('ClusterSTM step', g['clusterstm'], 'GFLOP')
    _row('  of which teacher forward', g['teacher_forward'], 'GFLOP')
    _row('unmasked step', g['unmasked'], 'GFLOP')
    # The 2.5x target is the default step's time ([unmasked]); this is the paper shape's FLOPs.
    _row('unmasked / ClusterSTM FLOPs', f['unmasked'] / f['clusterstm'], 'x')
    _row('unmasked / (ClusterSTM - teacher forward)',
         f['unmasked'] / (f['clusterstm'] - f['teacher_forward']), 'x')
    if FLAGS.flops_breakdown:
      print('  without VTM and MLM (video side: VTC [+ MRM]):')
      _row('ClusterSTM VTC + MRM', g['clusterstm_video'], 'GFLOP')
      _row('ClusterSTM VTC (no decoder)', g['clusterstm_vtc'], 'GFLOP')
      _row('unmasked VTC', g['unmasked_video'], 'GFLOP')
      _row('unmasked VTC / ClusterSTM VTC + MRM', f['unmasked_video'] / f['clusterstm_video'], 'x')

    print(f'\n[flops] default step ({config.batch_size} clips) achieved FLOP/s against a '
          f'{FLAGS.matmul_size}^2 f32 matmul')
    flops = cost_flops(trainer.lower(config.batch_size), compiled)
    un_flops = step_flops(unmasked_config(config), mesh, text, None, config.batch_size, compiled)
    peak = 2.0 * FLAGS.matmul_size**3 / times['matmul']['median']
    achieved = flops / (step_ms / 1e3)
    _row('default step', flops / 1e9, 'GFLOP')
    _row('default unmasked / ClusterSTM FLOPs', un_flops / flops, 'x')
    _row('default step achieved', achieved / 1e9, 'GFLOP/s')
    _row('matmul peak', peak / 1e9, 'GFLOP/s')
    _row('step / peak', 100 * achieved / peak, '% (both medians of interleaved calls)')


if __name__ == '__main__':
  app.run(main)
