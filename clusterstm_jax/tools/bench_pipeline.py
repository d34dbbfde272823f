"""Input-pipeline throughput: examples/s of the train loader for several grain worker counts.

  python -m clusterstm_jax.tools.bench_pipeline          # default shapes, workers 0 and 1
  python -m clusterstm_jax.tools.bench_pipeline --builder_config=tiny --worker_counts=0

Builds the dataset first if needed (that time is reported separately), then for each worker
count times `--num_batches` batches after `--warmup` batches (worker start-up excluded).
"""
from __future__ import annotations

import time

from absl import app, flags

from clusterstm_jax.data import pipeline

_CONFIG = flags.DEFINE_string("builder_config", "default", "shapes builder config")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "data dir (default: the data config's)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch size (one process)")
_BATCHES = flags.DEFINE_integer("num_batches", 40, "timed batches per worker count")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed batches first")
_WORKERS = flags.DEFINE_list("worker_counts", ["0", "1"], "grain worker counts to time")


def bench(data_config, tokenizer, worker_count: int, batch_size: int, num_batches: int,
          warmup: int) -> float:
  """Examples per second of the train loader with `worker_count` grain workers."""
  cfg = data_config.copy_and_resolve_references()
  cfg.worker_count = worker_count
  it = iter(pipeline.make_train_loader(cfg, tokenizer, global_batch_size=batch_size, seed=0,
                                       process_index=0, process_count=1))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  cfg = pipeline.default_data_config()
  cfg.builder_config = _CONFIG.value
  if _DATA_DIR.value:
    cfg.data_dir = _DATA_DIR.value
  start = time.perf_counter()
  tokenizer = pipeline.get_tokenizer(cfg)  # builds the dataset on first use
  print(f"dataset ready in {time.perf_counter() - start:.1f}s "
        f"({cfg.builder_config}, {cfg.data_dir})")
  for workers in [int(w) for w in _WORKERS.value]:
    rate = bench(cfg, tokenizer, workers, _BATCH.value, _BATCHES.value, _WARMUP.value)
    print(f"train loader, worker_count={workers}: {rate:.0f} examples/s "
          f"(batch {_BATCH.value}, {cfg.num_frames} frames of {cfg.image_size}px)")


if __name__ == "__main__":
  app.run(main)
