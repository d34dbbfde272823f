r"""Ahead-of-time compile report of one train step: per-device memory and FLOPs, on N CPU devices.

  python -m clusterstm_jax.tools.compile_report --config=configs/pretrain.py:paper --devices=256 \
      [--mesh=data=1,fsdp=-1,tensor=1] [--rules=fsdp] [--vocab_size=32000] \
      [--microbatches=1,4,16] [--config.x=y]

Simulates `--devices` CPU devices (XLA_FLAGS, set before jax is imported), builds the trainer the
training run builds (trainer.build_trainer: the same mesh, rules, shardings and jitted step) and
lowers and compiles its train step on abstract inputs: no dataset, no teacher weights, nothing
allocated.
Prints, per device:
  parameters / optimizer state / teacher / batch   bytes of each array's shard (from the shardings)
  XLA memory_analysis                              arguments, outputs, aliased (donated), temp
  XLA cost_analysis                                FLOPs and bytes accessed of one step
XLA's figures are those of the partitioned (per-device) program, scheduled to minimise memory
(SCHEDULER_FLAG). On CPU they show what sharding and remat buy; a TPU compile's temp memory
differs (other fusion and layouts; XLA:CPU computes bf16 matmuls in f32), the shard bytes do not.
Then, for each --microbatches value (default: config.microbatches; the step is compiled once
per value), the peak per device against the HBM of common accelerators (HBM_GIB), and which
of them it fits.
"""
from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging
import numpy as np

# None of these imports jax: `python -m` sets XLA_FLAGS (set_device_count) after this module's
# imports and before jax's, so the modules that import jax are imported inside the functions.
from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax.data.tokenizer import open_tokenizer
from clusterstm_jax.errors import UserError

FLAGS = flags.FLAGS
DEFAULT_DEVICES = 8
DEFAULT_VOCAB = 32000
MESH_AXES = ('data', 'fsdp', 'tensor')
# XLA:CPU's default scheduler orders a program for parallelism between its thunks, not for
# memory: it hoists every rematerialised forward (jax.checkpoint) to the start of the backward
# pass, so remat saves nothing in the memory analysis (docs/results.md, "Memory policy"). The
# report compiles with the memory-minimising scheduler, as TPU and GPU compilers schedule
# under a memory limit; running the program is unaffected (it is compiled for figures only).
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'
# HBM per chip (GiB) of the accelerators users book.
HBM_GIB = {'v5e': 16, 'v4': 32, 'v6e': 32, 'H100': 80, 'v5p': 95, 'H200': 141}


def define_flags() -> None:
  """After set_device_count: the --config default is loaded here, and config files import jax."""
  cli.define_config('configs/pretrain.py')
  flags.DEFINE_integer('devices', DEFAULT_DEVICES,
                       'Number of simulated CPU devices (the mesh size).')
  flags.DEFINE_string('mesh', None, 'Mesh axis sizes, e.g. "data=2,fsdp=4,tensor=1" (axes left '
                      'out are 1; one may be -1). Default: config.mesh.')
  flags.DEFINE_string('rules', None, 'Sharding rule set (data, fsdp, fsdp_tensor). Default: '
                      'config.sharding_rules.')
  flags.DEFINE_integer('vocab_size', None, 'Text vocabulary size. Default: the size of '
                       'config.data.tokenizer when that file exists, else 32000.')
  flags.DEFINE_integer('batch_size', None, 'Global batch. Default: config.batch_size.')
  flags.DEFINE_list('microbatches', None, 'Micro-batch counts to compile the step with, e.g. '
                    '"1,4,16". Default: config.microbatches.')
  flags.DEFINE_enum('teacher', 'auto', ['auto', 'model', 'config'],
                    'Abstract teacher, when the config needs one: "model" = config.teacher.model '
                    '(external SigLIP weights), "config" = the one config.teacher.config trains; '
                    'auto = the one a run would load (model when config.teacher.init is set), '
                    'or the other when only that one fits model.decoder.out_dim.')


def _devices_from_argv(argv) -> int:
  for i, arg in enumerate(argv):
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
    if arg == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return DEFAULT_DEVICES


def set_device_count(n: int) -> None:
  """N simulated CPU devices. Must run before jax is imported (the config file imports it)."""
  if 'jax' in sys.modules:
    raise RuntimeError('set_device_count must run before jax is imported')
  os.environ['XLA_FLAGS'] = report_xla_flags(os.environ.get('XLA_FLAGS', ''), n)
  os.environ['JAX_PLATFORMS'] = 'cpu'


def report_xla_flags(existing: str, n: int) -> str:
  """XLA_FLAGS `existing` with n host devices and the memory-minimising scheduler (replacing
  any earlier values of those two flags)."""
  kept = [f for f in existing.split()
          if not f.startswith(('--xla_force_host_platform_device_count', SCHEDULER_FLAG))]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={n}',
                          f'{SCHEDULER_FLAG}=false'])


def parse_mesh(spec: str) -> tuple[tuple[str, int], ...]:
  """'data=2,fsdp=4' -> (('data', 2), ('fsdp', 4), ('tensor', 1))."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for item in spec.split(','):
    name, eq, value = item.strip().partition('=')
    if name not in sizes or not eq:
      raise UserError(f'bad --mesh item {item!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}')
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f'bad --mesh size {value!r} for axis {name!r}') from None
  return tuple(sizes.items())


def resolve_vocab_size(config, flag_value: int | None) -> tuple[int, str]:
  if flag_value:
    return flag_value, '--vocab_size'
  path = os.path.expanduser(config.data.get('tokenizer', '') or '')
  if path and os.path.isfile(path):
    return open_tokenizer(path).vocab_size, path
  return DEFAULT_VOCAB, 'default (no tokenizer file)'


def make_abstract_teacher(config, mesh, vocab_size: int, which: str):
  """A Teacher with ShapeDtypeStruct params (sharded like a run's): lowers, never loads.

  'auto' takes the one a run would load (config.teacher.model when config.teacher.init is set,
  else config.teacher.config's); when its width is not the MRM decoder's out_dim (e.g. :paper
  before its SigLIP path is filled in) it takes the other.
  """
  if which != 'auto':
    teacher = _abstract_teacher(config, mesh, vocab_size, which)
    _check_width(config, teacher, which)
    return teacher, which
  first = 'model' if config.teacher.get('init') else 'config'
  second = 'config' if first == 'model' else 'model'
  teacher = _abstract_teacher(config, mesh, vocab_size, first)
  try:
    _check_width(config, teacher, first)
    return teacher, first
  except ValueError:
    teacher = _abstract_teacher(config, mesh, vocab_size, second)
    _check_width(config, teacher, second)
    return teacher, f'{second} (the {first!r} one does not fit model.decoder.out_dim)'


def _abstract_teacher(config, mesh, vocab_size: int, which: str):
  import flax.linen as nn  # lazy: flax imports jax (XLA_FLAGS first)
  import jax  # lazy: XLA_FLAGS first
  from clusterstm_jax import sharding as sharding_lib  # lazy: imports jax (XLA_FLAGS first)
  from clusterstm_jax import teacher as teacher_lib  # lazy: imports jax (XLA_FLAGS first)
  from clusterstm_jax.tasks import base as tasks_base  # lazy: imports jax (XLA_FLAGS first)
  from clusterstm_jax.tasks import siglip as siglip_task  # lazy: imports jax (XLA_FLAGS first)
  if which == 'model':
    return teacher_lib.abstract_teacher(config, mesh)
  # The architecture config.teacher.config trains (on the student's data), as a run would.
  tconfig = config_lib.load_config_file(config.teacher.config)
  with tconfig.unlocked():
    tconfig.data = config.data.copy_and_resolve_references()
  model = teacher_lib.with_policy(siglip_task.make_model(tconfig, vocab_size), config)
  boxed = tasks_base.abstract_params(model, siglip_task.init_inputs(tconfig))
  shardings = sharding_lib.tree_shardings(
      boxed, mesh, sharding_lib.logical_rules(config.sharding_rules))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  return teacher_lib.Teacher(model=model, params=params, param_shardings=shardings)


def _check_width(config, teacher, which: str) -> None:
  """The check load_teacher makes: MRM's decoder rebuilds tokens in the teacher's width."""
  import jax  # lazy: XLA_FLAGS first
  width = jax.tree.leaves(teacher.params['img']['Transformer']['encoder_norm'])[0].shape[-1]
  decoder = config.model.get('decoder')
  if (config.loss_weights.get('mrm', 0.0) > 0 and decoder is not None
      and decoder.get('out_dim') and decoder.out_dim != width):
    raise ValueError(f'model.decoder.out_dim={decoder.out_dim} != the width {width} of the '
                     f'{which!r} teacher (--teacher=model|config)')


def shard_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of arrays laid out by `shardings` (even shards)."""
  import jax  # lazy: XLA_FLAGS first
  total = 0
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                          jax.tree.leaves(shardings)):
    try:
      shape = s.shard_shape(x.shape)
    except ValueError:  # jax's IndivisibleError, with a page of detail
      raise ValueError(f'{jax.tree_util.keystr(path)} {tuple(x.shape)} does not divide over '
                       f'the mesh {dict(s.mesh.shape)} as {s.spec}; choose mesh sizes that '
                       'divide it (or pad the dimension)') from None
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def full_bytes(abstract_tree) -> int:
  import jax  # lazy: XLA_FLAGS first
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def report(config, *, vocab_size: int, teacher_choice: str = 'auto',
           batch_size: int | None = None) -> dict:
  """Lowers and compiles the train step of `config` on all local devices; returns the figures."""
  import jax  # lazy: XLA_FLAGS first
  from clusterstm_jax import sharding as sharding_lib  # lazy: imports jax (XLA_FLAGS first)
  from clusterstm_jax import tasks as tasks_lib  # lazy: imports jax (XLA_FLAGS first)
  from clusterstm_jax import trainer as trainer_lib  # lazy: imports jax (XLA_FLAGS first)

  mesh = sharding_lib.make_mesh(config.mesh)
  batch_size = batch_size or config.batch_size
  shards = sharding_lib.batch_size_per_shard(mesh)
  if batch_size % shards:
    raise UserError(f'batch size {batch_size} does not divide over the {shards} batch shards '
                     f'of mesh {dict(mesh.shape)}')
  config_lib.validate(config, shards, 1)  # the other cross-field checks of a run
  teacher, which = None, None
  if tasks_lib.needs_teacher(config):
    teacher, which = make_abstract_teacher(config, mesh, vocab_size, teacher_choice)
  # The schedule's length only changes constants of the step, never its shapes or memory.
  trainer = trainer_lib.build_trainer(config, mesh=mesh, vocab_size=vocab_size, total_steps=1000,
                                      warmup_steps=100, teacher=teacher)
  state, shardings = trainer.abstract_state, trainer.state_shardings
  out = dict(devices=jax.device_count(), mesh=dict(mesh.shape), rules=config.sharding_rules,
             batch_size=batch_size, vocab_size=vocab_size, teacher=which,
             num_params=sum(x.size for x in jax.tree.leaves(state['params'])))
  out['params_bytes'] = shard_bytes(state['params'], shardings['params'])
  out['params_bytes_unsharded'] = full_bytes(state['params'])
  out['opt_state_bytes'] = shard_bytes(state['opt_state'], shardings['opt_state'])
  out['opt_state_bytes_unsharded'] = full_bytes(state['opt_state'])
  if teacher is not None:
    out['teacher_bytes'] = shard_bytes(teacher.params, teacher.param_shardings)
    out['teacher_bytes_unsharded'] = full_bytes(teacher.params)
  batch = trainer.task.dummy_batch(batch_size)
  out['batch_bytes'] = full_bytes(batch) // shards

  compiled = trainer.lower(batch_size).compile()
  mem = compiled.memory_analysis()
  for name in ('argument', 'output', 'alias', 'temp', 'generated_code'):
    out[f'xla_{name}_bytes'] = int(getattr(mem, f'{name}_size_in_bytes', 0) or 0)
  # Live at the peak: inputs + outputs (donated inputs are reused as outputs) + scratch.
  out['xla_peak_bytes'] = (out['xla_argument_bytes'] + out['xla_output_bytes']
                           - out['xla_alias_bytes'] + out['xla_temp_bytes'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out['flops'] = float(cost.get('flops', float('nan')))
  out['bytes_accessed'] = float(cost.get('bytes accessed', float('nan')))
  return out


def _fmt_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024


def format_report(r: dict) -> str:
  mesh = ' x '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [f"{r['devices']} devices, mesh {mesh}, rules {r['rules']!r}, global batch "
           f"{r['batch_size']}, vocab {r['vocab_size']}, {r['num_params'] / 1e6:.2f}M params"
           + (f", teacher: {r['teacher']}" if r['teacher'] else ''),
           'per device:']
  def row(name, value, note=''):
    lines.append(f'  {name:<28s} {value:>12s}  {note}')
  for key, name in (('params', 'parameters'), ('opt_state', 'optimizer state'),
                    ('teacher', 'teacher (frozen)')):
    if f'{key}_bytes' in r:
      full = r[f'{key}_bytes_unsharded']
      row(name, _fmt_bytes(r[f'{key}_bytes']),
          f'of {_fmt_bytes(full)} ({r[f"{key}_bytes"] / max(full, 1):.1%})')
  row('batch', _fmt_bytes(r['batch_bytes']))
  row('XLA arguments', _fmt_bytes(r['xla_argument_bytes']))
  row('XLA outputs', _fmt_bytes(r['xla_output_bytes']))
  row('XLA aliased (donated)', _fmt_bytes(r['xla_alias_bytes']))
  row('XLA temp', _fmt_bytes(r['xla_temp_bytes']))
  row('XLA peak (arg+out-alias+temp)', _fmt_bytes(r['xla_peak_bytes']))
  row('FLOPs per step', f"{r['flops']:.4g}", f"({r['flops'] * r['devices']:.4g} all devices)")
  row('bytes accessed per step', _fmt_bytes(r['bytes_accessed']))
  return '\n'.join(lines)


def fits(peak_bytes: float) -> tuple[list[str], list[str]]:
  """(chips of HBM_GIB whose HBM holds `peak_bytes`, the others), smallest HBM first."""
  chips = sorted(HBM_GIB, key=HBM_GIB.get)
  yes = [c for c in chips if peak_bytes <= HBM_GIB[c] * 2**30]
  return yes, [c for c in chips if c not in yes]


def format_fit_table(rows: list[tuple[int, dict]]) -> str:
  """rows: (micro-batches, report) -> the peak per device against HBM_GIB."""
  lines = [f"{'micro-batches':>13s} {'per micro-batch':>15s} {'peak/device':>12s}  fits "
           f"(HBM GiB: {', '.join(f'{c} {g}' for c, g in HBM_GIB.items())})"]
  for micro, r in rows:
    yes, no = fits(r['xla_peak_bytes'])
    lines.append(f"{micro:>13d} {r['batch_size'] // micro:>15d} "
                 f"{_fmt_bytes(r['xla_peak_bytes']):>12s}  {', '.join(yes) or 'none'}"
                 + (f"; not {', '.join(no)}" if no else ''))
  return '\n'.join(lines)


def main() -> None:
  import jax  # lazy: XLA_FLAGS first
  config = FLAGS.config
  if jax.device_count() != FLAGS.devices:
    raise UserError(f'asked for {FLAGS.devices} devices, jax has {jax.device_count()} '
                    '(run this as `python -m clusterstm_jax.tools.compile_report`)')
  try:
    micro_counts = [int(m) for m in (FLAGS.microbatches or [config.microbatches])]
  except ValueError:
    raise UserError(f'--microbatches must be integers, got {FLAGS.microbatches}') from None
  rows = []
  try:
    with config.unlocked():
      if FLAGS.mesh:
        config.mesh = parse_mesh(FLAGS.mesh)
      if FLAGS.rules:
        config.sharding_rules = FLAGS.rules
    vocab_size, source = resolve_vocab_size(config, FLAGS.vocab_size)
    logging.info('vocab size %d from %s', vocab_size, source)
    for micro in micro_counts:
      with config.unlocked():
        config.microbatches = micro
        if FLAGS.batch_size:
          config.batch_size = FLAGS.batch_size
      r = report(config, vocab_size=vocab_size, teacher_choice=FLAGS.teacher)
      print(f'--- microbatches={micro} (dtype {config.dtype}, remat {config.remat})')
      print(format_report(r), flush=True)
      rows.append((micro, r))
  except ValueError as e:  # a mesh or batch that does not divide, a teacher that does not fit
    raise UserError(str(e)) from e
  print(format_fit_table(rows))


if __name__ == '__main__':
  set_device_count(_devices_from_argv(sys.argv))
  define_flags()
  cli.run(main)
