r"""Benchmarks that print figures (never timed tests): pipeline, step, masking, unmasked, FLOPs,
and, when named in --what, every masking strategy alone and the loader's worker counts.

  python -m clusterstm_jax.tools.benchmark --config=configs/pretrain.py [--steps=20]
      [--what=pipeline,step,masking,unmasked,flops] [--config.teacher.workdir=DIR]
  python -m clusterstm_jax.tools.benchmark --what=strategies [--batch=8 --repeats=20]
  python -m clusterstm_jax.tools.benchmark --what=workers [--builder_config=tiny --worker_counts=0]

  pipeline  the train step fed by the real loader running concurrently (workers and prefetch
            as in a run) against the same step on one fixed batch, in interleaved blocks of
            --block_steps steps (target: within 5%); and the loader's examples/s alone;
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
Only when named (they do not read --config):
  strategies  every masking strategy, jitted on random teacher features (median and min of
            --repeats calls, --batch clips each), in ms per call and per clip, at two shapes:
              paper   T=4, N=196 (ViT-B/16 at 224 px), D=768, --ratio 0.85 -> N_c=29;
              shapes  T=4, N=64 (64 px, patch 8), D=--shapes_dim, --ratio 0.85 -> N_c=10;
            plus the parts of 'clusterstm' (DPC alone; the temporal density with the per-frame
            distances it shares with DPC) to show where the time goes;
  decode    the paper shape's decode rate per core (synthetic 224 px JPEG clips, 4 frames,
            tools/input_rates.py) and the cores a v4 / v5e host needs at --mfu;
  workers   train-loader examples/s of the shapes data (--builder_config, --data_dir) for each
            of --worker_counts grain workers: --num_batches batches of --batch_size after
            --warmup (worker start-up excluded); building the dataset is reported separately.

Everything is measured in this one run: the timed programs are interleaved (rotating order),
each warmed the same way, and every figure is printed as median (min - max) over the rounds,
ratios taken round by round; the load average is printed at the start and the end.
"""
from __future__ import annotations

import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import prefetch
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import density as density_lib
from clusterstm_jax.masking import dpc as dpc_lib
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tools import input_rates
from clusterstm_jax.tools import timing

DEFAULT = ('pipeline', 'step', 'masking', 'unmasked', 'flops')
ALL = DEFAULT + ('strategies', 'workers', 'decode')
FLAGS = flags.FLAGS
cli.define_config('configs/pretrain.py', 'Config.')
flags.DEFINE_integer('steps', 20, 'Timed calls of each timed function (after compilation).')
flags.DEFINE_integer('batches', 30, 'Timed input batches.')
flags.DEFINE_integer('blocks', 6, 'pipeline: timed blocks of steps, with and without the loader')
flags.DEFINE_integer('block_steps', 5, 'pipeline: timed steps per block')
flags.DEFINE_integer('block_warm', 3, 'pipeline: untimed steps first in each block (at least '
                     'data.prefetch + 1: the queue the loader filled meanwhile is drained)')
flags.DEFINE_bool('rewarm', True, 'One untimed call before each timed call, for every program.')
flags.DEFINE_list('what', list(DEFAULT), f'Which benchmarks to run, a subset of {",".join(ALL)}.')
flags.DEFINE_string('flops_config', 'configs/pretrain.py:paper', 'Config of the FLOP ratio.')
flags.DEFINE_integer('flops_batch', 8, 'Batch the FLOP ratio is lowered with.')
flags.DEFINE_integer('paper_mask_batch', 8, 'Clips per call when timing the paper-shape masking.')
flags.DEFINE_integer('matmul_size', 2048, 'n of the n x n f32 matmul that measures peak FLOP/s.')
flags.DEFINE_bool('flops_compiled', False, 'Cost analysis of the compiled step (minutes on CPU at '
                  'the paper scale) instead of the lowered one (seconds, within 0.1%).')
flags.DEFINE_bool('flops_breakdown', True, 'Also the FLOPs without VTM/MLM (and MRM).')
# --what=strategies
flags.DEFINE_integer('batch', 8, 'strategies: clips per call')
flags.DEFINE_integer('repeats', 10, 'strategies: timed calls (median and min reported)')
flags.DEFINE_integer('shapes_dim', 64, 'strategies: teacher width for the "shapes" setting')
flags.DEFINE_float('ratio', 0.85, 'strategies: masking ratio')
# --what=workers
flags.DEFINE_string('builder_config', 'default', 'workers: shapes builder config')
flags.DEFINE_string('data_dir', None, "workers: data dir (default: the data config's)")
flags.DEFINE_integer('batch_size', 64, 'workers: global batch size (one process)')
flags.DEFINE_integer('num_batches', 40, 'workers: timed batches per worker count')
flags.DEFINE_integer('warmup', 3, 'workers: untimed batches first')
flags.DEFINE_list('worker_counts', ['0', '1'], 'workers: grain worker counts to time')
# --what=decode
flags.DEFINE_integer('decode_clips', 32, 'decode: synthetic paper-shape clips per timed pass')
flags.DEFINE_float('mfu', 0.4, 'decode: model FLOP utilisation assumed for the accelerators')
flags.DEFINE_float('gflop_per_clip', 0.0, 'decode: step GFLOP per clip; 0 = from XLA\'s cost '
                   'analysis of the --flops_config step (lowered at --flops_batch)')


def host_batch(config, tokenizer, teacher=None) -> dict[str, np.ndarray]:
  """One real batch of the train loader (real frames, captions and object labels; with a
  teacher, the captions in its own ids too)."""
  loader = pipeline.make_train_loader(
      config.data, tokenizer, global_batch_size=config.batch_size, seed=0, process_index=0,
      process_count=1, teacher_text=teacher.text_stream if teacher is not None else None)
  return next(iter(loader))


def make_trainer(config, mesh, text, teacher):
  return trainer_lib.build_trainer(config, text=text, mesh=mesh, total_steps=1000,
                                   warmup_steps=10, teacher=teacher)


def masking_runners(config, teacher, batch) -> tuple:
  """(mask_from_config jitted on the teacher tokens of `batch`, precomputed so the teacher is
  excluded; the teacher's forward alone; the tokens' shape), as blocking no-argument calls."""
  t, h, w = tasks_base.grid(config)
  b = batch['video'].shape[0]
  teacher_fn = jax.jit(lambda p, v: teacher.frame_tokens(p, tasks_base.normalize_video(v)))
  features = teacher_fn(teacher.params, batch['video'])
  fn = jax.jit(lambda f, k: masking.mask_from_config(config.mask, k, (b, t, h * w), f))
  key = jax.random.key(2)

  def masks():  # None: timing.time_interleaved times the call (a value would be its seconds)
    jax.block_until_ready(fn(features, key))

  def teacher_forward():
    jax.block_until_ready(teacher_fn(teacher.params, batch['video']))
  return masks, teacher_forward, tuple(features.shape)


def paper_shape_masking(batch: int, repeats: int, ratio: float = 0.85) -> tuple[float, int]:
  """(median ms per clip, N_c) of 'clusterstm' masking at T=4, N=196, D=768 (random tokens)."""
  cfg = masking.default_mask_config()
  cfg.strategy, cfg.ratio = 'clusterstm', ratio
  shape = (batch, 4, 196)
  features = jax.random.normal(jax.random.key(0), (*shape, 768))
  fn = jax.jit(lambda f, k: masking.mask_from_config(cfg, k, shape, f))
  key = jax.random.key(1)
  t = timing.time_interleaved({'m': lambda: jax.block_until_ready(fn(features, key))},
                              repeats, rewarm=False)['m']
  return 1e3 * t['median'] / batch, masking.num_keep(196, ratio)


def unmasked_config(config):
  """The same student seeing every token: random 'masking' at ratio 0, no decoder, no MRM
  (so no teacher either). VTC, VTM and MLM are unchanged."""
  return config_lib.with_overrides(config, **{'mask.strategy': 'random', 'mask.ratio': 0.0,
                            'loss_weights.mrm': 0.0, 'model.decoder.out_dim': 0})


NO_TEXT_LOSSES = {'loss_weights.vtm': 0.0, 'loss_weights.mlm': 0.0}


def step_flops(config, mesh, text, teacher, batch_size: int, compiled: bool) -> float:
  trainer = make_trainer(config, mesh, text, teacher)
  return timing.cost_flops(trainer.lower(batch_size), compiled)


def paper_flops(spec: str, batch_size: int, compiled: bool,
                breakdown: bool = True) -> dict[str, float]:
  """Step FLOPs of ClusterSTM and of the unmasked student at `spec` (abstract inputs only),
  the teacher's forward, and (breakdown) the same pair without the text-side losses."""
  # One pass over the batch: XLA's cost analysis counts a loop's body once, so the FLOPs of
  # a step accumulated over micro-batches (a lax.scan) would read as one micro-batch's.
  config = config_lib.with_overrides(config_lib.load_config_file(spec), microbatches=1)
  mesh = sharding_lib.make_mesh(config.mesh)
  text = tasks_lib.TextSpec(config.teacher.model.vocab_size)
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
    out['teacher_forward'] = timing.cost_flops(
        jax.jit(teacher.frame_tokens).lower(teacher.params, video), compiled)
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


def bench_strategies(name: str, b: int, t: int, n: int, d: int, ratio: float,
                     repeats: int) -> None:
  """--what=strategies at one shape: every strategy and the parts of 'clusterstm'."""
  nc = masking.num_keep(n, ratio)
  key = jax.random.key(0)
  features = jax.random.normal(key, (b, t, n, d), jnp.float32)
  print(f'\n[{name}] B={b} T={t} N={n} D={d} ratio={ratio} N_c={nc}  '
        f'({jax.devices()[0].platform}, {jax.device_count()} device(s))')
  print(f'  {"what":44s} {"ms/call":>9s} {"ms/clip":>9s} {"min ms/clip":>12s}')
  rows = []
  for strategy in masking.STRATEGIES:
    for normalize in ((True, False) if strategy == 'clusterstm' else (True,)):
      fn = jax.jit(lambda f, r, s=strategy, nz=normalize: masking.compute_mask(
          s, r, shape=(b, t, n), num_keep=nc, features=f, normalize=nz))
      label = strategy + ('' if normalize else ' (normalize=False)')
      rows.append((label, timing.time_ms(fn, features, key, repeats=repeats)))
  dpc_fn = jax.jit(lambda f: dpc_lib.dpc_knn(f, nc, k=5, normalize=True))
  rows.append(('  part: DPC-KNN alone (own per-frame GEMM)',
               timing.time_ms(dpc_fn, features, repeats=repeats)))
  dens_fn = jax.jit(lambda f: density_lib.temporal_log_density_and_sq_dists(f))
  rows.append(('  part: temporal density + frame distances',
               timing.time_ms(dens_fn, features, repeats=repeats)))
  for label, (med, low) in rows:
    print(f'  {label:44s} {med:9.2f} {med / b:9.3f} {low / b:12.3f}')


def bench_workers() -> None:
  cfg = pipeline.default_data_config()
  cfg.builder_config = FLAGS.builder_config
  if FLAGS.data_dir:
    cfg.data_dir = FLAGS.data_dir
  start = time.perf_counter()
  tokenizer = pipeline.get_tokenizer(cfg)  # builds the dataset on first use
  print(f'dataset ready in {time.perf_counter() - start:.1f}s '
        f'({cfg.builder_config}, {cfg.data_dir})')
  for workers in [int(w) for w in FLAGS.worker_counts]:
    rate = input_rates.loader_rate(cfg, tokenizer, workers, FLAGS.batch_size, FLAGS.num_batches,
                       FLAGS.warmup)
    print(f'train loader, worker_count={workers}: {rate:.0f} examples/s '
          f'(batch {FLAGS.batch_size}, {cfg.num_frames} frames of {cfg.image_size}px)')


def _row(name: str, value: float | str, unit: str = '') -> None:
  """value: a number, or timing.fmt's 'median (min - max)'."""
  print(f'{name:>44s}: {value if isinstance(value, str) else f"{value:12.4g}":>12s} {unit}')


def bench_config(config, what: list[str]) -> None:
  """The sections of DEFAULT in `what`, on `config`'s data, model and teacher."""
  tokenizer = pipeline.get_tokenizer(config.data)
  print(f'{jax.device_count()} {jax.devices()[0].platform} device(s); config batch '
        f'{config.batch_size}, mask {config.mask.strategy} r={config.mask.ratio}; '
        f'{prefetch.host_cores()} host cores; load average at start {timing.load_average()}')
  print('figures: median (min - max) over interleaved rounds; ratios taken per round')
  step_ms = None

  needs_step = set(what) & {'step', 'masking', 'unmasked', 'flops', 'pipeline'}
  if needs_step:
    mesh = sharding_lib.make_mesh(config.mesh)
    text = tasks_lib.TextSpec.from_tokenizer(tokenizer)
    teacher = None
    if tasks_lib.needs_teacher(config):
      loop.prepare_teacher(config)  # trains and exports a missing default teacher first
      teacher = teacher_lib.load_teacher(config, mesh)
    batch = sharding_lib.global_batch(host_batch(config, tokenizer, teacher), mesh)
    trainer = make_trainer(config, mesh, text, teacher)
  if set(what) & {'step', 'masking', 'unmasked', 'flops'}:
    fns = {'step': timing.step_runner(trainer, batch)}
    if 'masking' in what:
      if teacher is None:
        raise UserError(f'--what=masking needs a teacher; mask.strategy is '
                        f'{config.mask.strategy!r}')
      fns['masking'], fns['teacher'], feature_shape = masking_runners(config, teacher, batch)
    if 'unmasked' in what:
      fns['unmasked'] = timing.step_runner(  # no teacher: no teacher_text in its batches
          make_trainer(unmasked_config(config), mesh, text, None),
          {k: v for k, v in batch.items() if k != 'teacher_text'})
    if 'flops' in what:  # timed with the step, so that both see the same machine load
      fns['matmul'] = timing.matmul_runner(FLAGS.matmul_size)
    times = timing.time_interleaved(fns, FLAGS.steps, rewarm=FLAGS.rewarm)
    step_ms = 1e3 * times['step']['median']
    print(f'\n[step] default train step ({FLAGS.steps} rounds of {", ".join(fns)}; every '
          f'program warmed alike: 2 calls{", and 1 before each timed call" * FLAGS.rewarm})')
    _row('step ms', timing.fmt(times['step']), 'ms')
    _row('step examples/s', config.batch_size / times['step']['median'], 'ex/s')
    if 'masking' in what:
      print(f'\n[masking] mask_from_config alone on teacher tokens {feature_shape}')
      _row('masking ms', timing.fmt(times['masking']), 'ms')
      _row('masking / step', timing.fmt(timing.ratio(times, 'masking', 'step'), 100),
           '% (target <= 5%)')
      _row('for scale: teacher forward ms', timing.fmt(times['teacher']), 'ms')
      _row('teacher forward / step', timing.fmt(timing.ratio(times, 'teacher', 'step'), 100),
           '%')
      per_clip, nc = paper_shape_masking(FLAGS.paper_mask_batch, FLAGS.steps)
      _row(f'paper shape T=4 N=196 D=768 N_c={nc}, per clip', per_clip, 'ms/clip')
    if 'unmasked' in what:
      print('\n[unmasked] same student, ratio 0, no decoder / MRM / teacher')
      _row('unmasked step ms', timing.fmt(times['unmasked']), 'ms')
      _row('unmasked / ClusterSTM step time',
           timing.fmt(timing.ratio(times, 'unmasked', 'step'), 1, 2),
           f'x (target >= 2.5x at r={config.mask.ratio})')

  if 'pipeline' in what:
    workers = prefetch.resolve_worker_count(config.data.get('worker_count', 0))
    # The loader as the run's: with a teacher, its batches carry the captions in its ids too.
    teacher_text = teacher.text_stream if teacher is not None else None
    rate = input_rates.loader_rate(config.data, tokenizer, config.data.get('worker_count', 0),
                                   config.batch_size, FLAGS.batches, 1, teacher_text)
    fns, batches = input_rates.concurrent_runners(
        config, tokenizer, trainer, batch, mesh, FLAGS.block_steps, FLAGS.block_warm,
        teacher_text)
    # Two programs of several steps each: warmed by their own block warm-up, not by rewarm.
    ptimes = timing.time_interleaved(fns, FLAGS.blocks, warmup=1, rewarm=False)
    batches.close()
    print(f'\n[pipeline] train loader: worker_count={workers} '
          f'(config {config.data.get("worker_count", 0)}), prefetch {batches.depth} '
          f'batches; {FLAGS.blocks} rounds of {FLAGS.block_steps} timed steps per program')
    _row('loader alone examples/s', rate, 'ex/s')
    if step_ms is not None:
      _row('loader alone / step', rate / (config.batch_size / (step_ms / 1e3)), 'x')
    _row('step alone ms (same batch)', timing.fmt(ptimes['step_alone']), 'ms')
    _row('step with the loader concurrently ms', timing.fmt(ptimes['step_loader']), 'ms')
    _row('with loader / alone step time',
         timing.fmt(timing.ratio(ptimes, 'step_loader', 'step_alone'), 1, 3),
         'x (target <= 1.05)')

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
    flops = timing.cost_flops(trainer.lower(config.batch_size), compiled)
    un_flops = step_flops(unmasked_config(config), mesh, text, None, config.batch_size, compiled)
    peak = 2.0 * FLAGS.matmul_size**3 / times['matmul']['median']
    achieved = flops / (step_ms / 1e3)
    _row('default step', flops / 1e9, 'GFLOP')
    _row('default unmasked / ClusterSTM FLOPs', un_flops / flops, 'x')
    _row('default step achieved', achieved / 1e9, 'GFLOP/s')
    _row('matmul peak', peak / 1e9, 'GFLOP/s')
    _row('step / peak', 100 * achieved / peak, '% (both medians of interleaved calls)')
  print(f'\nload average at end {timing.load_average()}')


def bench_decode(tokenizer) -> None:
  """--what=decode: paper-shape decode rate per core and the host cores it implies."""
  print(f'\n[decode] load average at start {timing.load_average()}')
  clips = input_rates.synthetic_clips(FLAGS.decode_clips)
  rate = input_rates.decode_rate(clips, tokenizer)
  kib = np.mean([sum(len(f) for f in c['frames']) for c in clips]) / 1024
  _row('clips per CPU second (4 of 8 JPEG 224x398)', timing.fmt(rate, 1),
       f'(wall {rate["wall"]:.1f}/s; {kib:.0f} KiB/clip)')
  gflop = FLAGS.gflop_per_clip
  if gflop <= 0:
    f = paper_flops(FLAGS.flops_config, FLAGS.flops_batch, False, breakdown=False)
    gflop = f['clusterstm'] * jax.device_count() / FLAGS.flops_batch / 1e9
    _row(f'{FLAGS.flops_config} GFLOP per clip (video step)', gflop, 'GFLOP')
  for name, h in input_rates.cores_needed(rate['median'], gflop * 1e9, FLAGS.mfu).items():
    _row(f'{name} host ({h["chips"]} chips x {h["peak_tflops"]:.0f} TFLOP/s, MFU {FLAGS.mfu:.0%})',
         h['clips_s'], f'clips/s -> {h["cores"]:.1f} cores decoding')
  print(f'load average at end {timing.load_average()}')


def main() -> None:
  what = [w.strip() for w in FLAGS.what if w.strip()]
  unknown = sorted(set(what) - set(ALL))
  if unknown:
    raise UserError(f'unknown --what {unknown}; known: {",".join(ALL)}')
  if set(what) & set(DEFAULT):
    bench_config(FLAGS.config, what)
  if 'strategies' in what:
    bench_strategies('paper', FLAGS.batch, 4, 196, 768, FLAGS.ratio, FLAGS.repeats)
    bench_strategies('shapes', FLAGS.batch, 4, 64, FLAGS.shapes_dim, FLAGS.ratio, FLAGS.repeats)
  if 'workers' in what:
    bench_workers()
  if 'decode' in what:
    bench_decode(pipeline.get_tokenizer(FLAGS.config.data))


if __name__ == '__main__':
  cli.run(main)
