r"""The offline teacher pass: the frozen teacher once over the training examples, K views each.

  python -m clusterstm_jax.tools.teacher_cache --config=configs/pretrain.py [--views=4] \
      [--cache_dir=DIR] [--shard_size=256] [--batch_size=64]

Writes DIR (default <data_dir>/teacher_cache/<dataset>-<split>-<K>v; data/teacher_cache.py has
the layout): for view v of example j, the view's frames and crop, the kept-token indices of the
cluster mask, the per-token MRM target and the teacher's text feature of the caption, computed
by tasks/pretrain.py `teacher_signals`, the function the live step calls. Then train with
`--config.teacher.cache=DIR`: the step runs no teacher.

Each process (jax.process_index() of jax.process_count()) writes its own shards (i % count),
on its local devices. A shard is written to a temp file and renamed when whole; running the
command again skips the shards that exist, so a killed pass resumes where it stopped.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from PIL import Image

from clusterstm_jax import cli
from clusterstm_jax import config_lib
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import teacher_cache as cache_lib
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tasks import pretrain
from clusterstm_jax.tasks import siglip as siglip_task

FLAGS = flags.FLAGS


def default_dir(config, views: int) -> str:
  d = config.data
  return os.path.join(os.path.expanduser(d.data_dir), 'teacher_cache',
                      f'{d.name}-{d.builder_config or "default"}-{d.train_split}-{views}v')


def signals_fn(config, teacher):
  """Jitted (teacher params, video uint8, the teacher's ids) -> the batch's teacher_signals as
  the live step computes them (the 'clusterstm' mask is deterministic: the rng is unused)."""
  grid = tasks_base.grid(config)

  def fn(tparams, video, ids):
    return pretrain.teacher_signals(config, teacher, tparams, tasks_base.normalize_video(video),
                                    ids, jax.random.key(0), grid)
  return jax.jit(fn)


def cached_config(config):
  """`config` reading a teacher cache: the step takes the mask and MRM target from the batch
  and has no teacher (the path is not read by the step; compile reports and benchmarks)."""
  return config_lib.with_overrides(config, **{'teacher.cache': '<cache>', 'images.every': 0})


def with_signals(config, teacher, batch: dict) -> dict:
  """A host batch plus the teacher's fields, as the cached loader gives them (its view): the
  teacher's own ids are spent on the text feature and dropped (a cached batch has none)."""
  out = jax.device_get(signals_fn(config, teacher)(teacher.params, batch['video'],
                                                    batch['teacher_text']))
  rest = {k: v for k, v in batch.items() if k != 'teacher_text'}
  return dict(rest, **{k: np.asarray(v) for k, v in out.items()})


def bench_teacher(config, mesh, vocab_size: int, tokenizer=None):
  """(teacher, how): the config's teacher where it exists, else one of its architecture with
  random weights (the same FLOPs and time; for measurements only) reading `tokenizer`'s ids."""
  if config.teacher.get('init') or teacher_lib.has_export(config):
    return teacher_lib.load_teacher(config, mesh), 'loaded'
  tconfig = config_lib.load_config_file(config.teacher.config)
  model = teacher_lib.with_policy(siglip_task.make_model(tconfig, vocab_size), config)
  params = nn.unbox(jax.jit(lambda r: model.init(r, *siglip_task.init_inputs(tconfig)))(
      jax.random.key(0))['params'])
  repl = sharding_lib.replicated(mesh)
  return teacher_lib.Teacher(model=model, params=jax.device_put(params, repl),
                             param_shardings=jax.tree.map(lambda _: repl, params),
                             tokenizer=tokenizer), 'random'


def time_pass(config, teacher, source, tokenizer, num: int, batch_size: int) -> dict:
  """run_pass's stats over the first `num` examples (K = 1), after a warm-up batch (compile)."""
  fn = signals_fn(config, teacher)
  subset = [source[j] for j in range(num)]
  with tempfile.TemporaryDirectory() as tmp:
    run_pass(config, teacher, os.path.join(tmp, 'warm'), views=1, source=subset[:batch_size],
             tokenizer=tokenizer, shard_size=batch_size, batch_size=batch_size, fn=fn)
    return run_pass(config, teacher, os.path.join(tmp, 'timed'), views=1, source=subset,
                    tokenizer=tokenizer, shard_size=256, batch_size=batch_size, fn=fn)


def _frame_hw(jpeg: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(jpeg)) as im:  # the header only
    return im.size[1], im.size[0]


def run_pass(config, teacher, cache_dir: str, *, views: int, source, tokenizer,
             shard_size: int = 256, batch_size: int = 64, mesh=None, process_index: int = 0,
             process_count: int = 1, max_shards: int | None = None, fn=None) -> dict:
  """Writes this process's missing shards of the cache of `source` (the training examples).

  `mesh`: this process's devices (default: all local devices, data-parallel); `max_shards`
  stops after that many shards (tests of a killed pass); `fn`: signals_fn's result, reused.
  Returns counts and seconds.
  """
  cache_lib.check_config(config)
  if views < 1 or shard_size < 1 or batch_size < 1:
    raise UserError(f'views, shard_size and batch_size must be >= 1, got {views}, '
                    f'{shard_size}, {batch_size}')
  cache_dir = os.path.expanduser(cache_dir)
  t, h, w = tasks_base.grid(config)
  nc = masking.num_keep(h * w, config.mask.ratio)
  patch = tasks_base.patch_size(config)
  num_shards = max(1, math.ceil(len(source) / shard_size))
  manifest = dict(fingerprint=teacher_lib.cache_fingerprint(config), views=views,
                  shard_size=shard_size, num_shards=num_shards, num_examples=len(source),
                  layout=cache_lib.layout(t, h * w, nc, config.model.decoder.out_dim))
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, cache_lib.MANIFEST)
  if os.path.exists(path):
    have = cache_lib.read_manifest(path)
    if have != manifest:
      diff = cache_lib.first_diff(manifest, have)
      raise UserError(f'{cache_dir} holds a teacher cache of another config or --views/'
                      f'--shard_size ({diff}); use another --cache_dir or delete it')
  else:  # every process writes the same content, atomically
    cache_lib.write_json_atomic(path, manifest)

  mesh = mesh or sharding_lib.make_mesh((('data', -1), ('fsdp', 1), ('tensor', 1)),
                                        devices=jax.local_devices())
  per = mesh.devices.size
  batch_size = math.ceil(batch_size / per) * per
  fn = fn or signals_fn(config, teacher)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  # The teacher reads the captions in its own ids (teacher_signals); a teacher without a
  # tokenizer (bench_teacher's random one) shares the student's, as the default teacher does.
  kwargs = dict(tokenizer=tokenizer, num_frames=t, image_size=config.data.image_size,
                max_text_len=config.data.max_text_len,
                teacher_tokenizer=tokenizer if teacher.tokenizer is None else teacher.tokenizer,
                teacher_text_len=teacher.model.text_len)
  todo = [i for i in cache_lib.missing_shards(cache_dir, num_shards)
          if i % process_count == process_index][:max_shards]
  t0, done = time.perf_counter(), 0
  for i in todo:
    items = [(j, v) for j in range(i * shard_size, min((i + 1) * shard_size, len(source)))
             for v in range(views)]
    records = []
    for start in range(0, len(items), batch_size):
      chunk = items[start:start + batch_size]
      rows = []
      for j, v in chunk:
        ex = source[j]
        view = cache_lib.make_view(config.seed, j, v, len(ex['frames']),
                                   *_frame_hw(ex['frames'][0]), t, config.data.image_size, patch)
        row = pipeline.decode_example(ex, rng=None, view=(view['frames'], view['crop']),
                                      **kwargs)
        rows.append((view, row))
      pad = batch_size - len(rows)  # the last batch: repeat its last row, drop the outputs
      video = np.stack([r['video'] for _, r in rows] + [rows[-1][1]['video']] * pad)
      ids = np.stack([r['teacher_text'] for _, r in rows] + [rows[-1][1]['teacher_text']] * pad)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = fn(teacher.params, jax.device_put(video, sharding_lib.batch_sharding(mesh, 5)),
                 jax.device_put(ids, sharding_lib.batch_sharding(mesh, 2)))
      out = jax.device_get(out)
      for k, (view, _) in enumerate(rows):
        records.append(cache_lib.encode(dict(view, **{f: out[f][k] for f in cache_lib.FIELDS}),
                                        manifest['layout']))
    cache_lib.write_shard(os.path.join(cache_dir, cache_lib.shard_name(i, num_shards)), records)
    done += len(items)
  seconds = time.perf_counter() - t0
  return dict(shards=len(todo), clip_views=done, seconds=seconds,
              seconds_per_clip_view=seconds / max(done, 1),
              missing=len(cache_lib.missing_shards(cache_dir, num_shards)))


def main() -> None:
  config = FLAGS.config
  pretrain_cache = config.teacher.get('cache')
  cache_dir = FLAGS.cache_dir or pretrain_cache or default_dir(config, FLAGS.views)
  with config.unlocked():
    config.teacher.cache = ''  # the pass runs the live teacher
  cache_lib.check_config(config)
  pipeline.check_data_dir(config.data)
  loop.prepare_teacher(config, always=True)  # trains and exports a missing default teacher
  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.local_devices())
  teacher = teacher_lib.load_teacher(config, mesh)
  source = pipeline.train_source(config.data, 'captions', announce=jax.process_index() == 0)
  stats = run_pass(config, teacher, cache_dir, views=FLAGS.views, source=source,
                   tokenizer=pipeline.get_tokenizer(config.data), shard_size=FLAGS.shard_size,
                   batch_size=FLAGS.batch_size or config.batch_size, mesh=mesh,
                   process_index=jax.process_index(), process_count=jax.process_count())
  print(f'teacher cache {cache_dir}: wrote {stats["shards"]} shards ({stats["clip_views"]} '
        f'clip-views) in {stats["seconds"]:.1f} s ({stats["seconds_per_clip_view"] * 1e3:.2f} '
        f'ms per clip-view); {stats["missing"]} shards missing')
  if not stats['missing']:
    print(f'train with --config.teacher.cache={cache_dir}')


if __name__ == '__main__':
  cli.define_config()
  flags.DEFINE_integer('views', 4, 'Views (frames + crop) stored per example.')
  flags.DEFINE_string('cache_dir', '', 'Where to write; default config.teacher.cache, else '
                      '<data_dir>/teacher_cache/<dataset>-<config>-<split>-<K>v.')
  flags.DEFINE_integer('shard_size', 256, 'Examples per shard (file).')
  flags.DEFINE_integer('batch_size', 0, 'Examples per teacher batch; 0 = config.batch_size.')
  cli.run(main)
