r"""Benchmarks that print figures (never timed tests): the input pipeline against the train step.

  python -m clusterstm_jax.tools.benchmark --config=configs/pretrain.py [--steps=20]

Both are measured in this one run, on this machine, so the ratio is meaningful even when the
machine is noisy. The pipeline must keep up with the step with a margin (>= 3x on the default).
"""
from __future__ import annotations

import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/pretrain.py', 'Config.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed train steps (after compilation).')
flags.DEFINE_integer('batches', 30, 'Timed input batches.')
flags.DEFINE_multi_string('what', ['pipeline', 'step'], 'Which benchmarks to run.')


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


def bench_step(config, tokenizer, num_steps: int, teacher=None) -> tuple[float, dict]:
  import jax
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  mesh = sharding_lib.make_mesh(config.mesh)
  trainer = step_lib.build_trainer(config, text=step_lib.TextSpec.from_tokenizer(tokenizer),
                                   mesh=mesh,
                                   total_steps=1000, warmup_steps=10, teacher=teacher)
  state = trainer.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  host = step_lib.dummy_batch(config, config.batch_size)
  host['video'] = rng.integers(0, 256, host['video'].shape, dtype=np.uint8)
  host['text'] = rng.integers(1, tokenizer.vocab_size, host['text'].shape).astype(np.int32)
  batch = sharding_lib.global_batch(host, mesh)
  key = jax.random.key(1)
  state, metrics = trainer.train_step(state, batch, key)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(num_steps):
    t = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return config.batch_size / float(np.median(times)), {'step_ms': 1e3 * float(np.median(times))}


def main(argv):
  del argv
  from clusterstm_jax.data import pipeline
  config = FLAGS.config
  tokenizer = pipeline.get_tokenizer(config.data)
  out = {}
  if 'step' in FLAGS.what:
    teacher = None
    if config.get('teacher') is not None:
      from clusterstm_jax import sharding as sharding_lib
      from clusterstm_jax import teacher as teacher_lib
      teacher = teacher_lib.load_teacher(config, sharding_lib.make_mesh(config.mesh))
    out['step_examples_per_s'], extra = bench_step(config, tokenizer, FLAGS.steps, teacher)
    out.update(extra)
  if 'pipeline' in FLAGS.what:
    out['pipeline_examples_per_s'] = bench_pipeline(config, tokenizer, FLAGS.batches)
  for k, v in out.items():
    print(f'{k:>28s}: {v:10.1f}')
  if len(out) >= 3:
    print(f'{"pipeline / step":>28s}: {out["pipeline_examples_per_s"] / out["step_examples_per_s"]:10.2f}x')


if __name__ == '__main__':
  app.run(main)
