"""Input-side rates of tools/benchmark.py: the train loader alone (--what=pipeline, workers),
the step fed by it concurrently (--what=pipeline), and how many host cores decoding needs at
the paper's shape (--what=decode).

Synthetic clips stored as the real builders store them (data/builders/common.py: 8 JPEG frames,
quality 90, short side 224; 16:9 as WebVid's, so 224 x 398), decoded by the train loader's own
per-example function (data/pipeline.py decode_example: 4 frames sampled, a square crop,
resized to 224, the caption tokenised), one thread: clips per CPU second, i.e. per core. Against the
step rate an accelerator host sustains, rate = chips * peak * MFU / FLOPs per clip, that gives
the cores a host needs for decoding alone.
"""
from __future__ import annotations

import time

import numpy as np

from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import prefetch
from clusterstm_jax.data import video_io
from clusterstm_jax.tools import timing

# bf16 peak TFLOP/s per chip and chips per host (Cloud TPU system architecture pages).
HOSTS = {'v4': dict(peak_tflops=275.0, chips=4), 'v5e': dict(peak_tflops=197.0, chips=8)}


def synthetic_frame(rng: np.random.Generator, height: int = 224, width: int = 398) -> np.ndarray:
  """A frame with the spectrum of a photo more than of noise: smooth colour fields (upsampled
  coarse noise), a few hard-edged rectangles, mild sensor noise. Pure noise would cost a JPEG
  decoder several times what natural video does."""
  coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
  smooth = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:height, :width]
  for _ in range(4):
    y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
    smooth[y:y + rng.integers(10, height - y), x:x + rng.integers(10, width - x)] = rng.integers(
        0, 256, 3)
  frame = smooth + rng.normal(0, 4, smooth.shape)
  return np.clip(frame, 0, 255).astype(np.uint8)


def synthetic_clips(num: int, frames: int = 8, seed: int = 0) -> list[dict]:
  """`num` stored examples as a real builder writes them (JPEG bytes, caption, id)."""
  rng = np.random.default_rng(seed)
  return [{'frames': [video_io.encode_jpeg(synthetic_frame(rng), 90) for _ in range(frames)],
           'caption': 'a person walks a dog along a beach at sunset', 'id': np.int32(i),
           'labels': None} for i in range(num)]


def decode_rate(clips: list[dict], tokenizer, *, num_frames: int = 4, image_size: int = 224,
                max_text_len: int = 64, repeats: int = 3) -> dict[str, float]:
  """Clips decoded per CPU second of this thread (= per core, whatever else the machine runs):
  min / median / max over `repeats` passes over `clips` (one untimed pass first), and the
  wall-clock median beside it (`wall`)."""
  rng = np.random.default_rng(0)

  def one_pass():
    t, c = time.perf_counter(), time.thread_time()
    for ex in clips:
      pipeline.decode_example(ex, tokenizer=tokenizer, num_frames=num_frames,
                              image_size=image_size, max_text_len=max_text_len, rng=rng)
    return len(clips) / (time.thread_time() - c), len(clips) / (time.perf_counter() - t)

  one_pass()
  rates = [one_pass() for _ in range(repeats)]
  cpu = sorted(r[0] for r in rates)
  return dict(min=cpu[0], median=cpu[len(cpu) // 2], max=cpu[-1],
              wall=sorted(r[1] for r in rates)[len(rates) // 2])


def cores_needed(clips_per_core_s: float, flops_per_clip: float, mfu: float) -> dict[str, dict]:
  """Per host of HOSTS: the clips/s its chips consume at `mfu` and the decoding cores for it."""
  out = {}
  for name, h in HOSTS.items():
    clips_s = h['chips'] * h['peak_tflops'] * 1e12 * mfu / flops_per_clip
    out[name] = dict(clips_s=clips_s, cores=clips_s / clips_per_core_s, **h)
  return out


def loader_rate(data_config, tokenizer, worker_count: int, batch_size: int, num_batches: int,
                warmup: int, teacher_text=None) -> float:
  """Examples per second of the train loader alone with `worker_count` workers (-1: from the
  cores), after `warmup` batches (worker start-up is not throughput); `teacher_text`: the
  teacher's text stream, when the batches carry the captions in its ids too."""
  cfg = data_config.copy_and_resolve_references()
  cfg.worker_count = worker_count
  it = iter(pipeline.make_train_loader(cfg, tokenizer, global_batch_size=batch_size, seed=0,
                                       process_index=0, process_count=1,
                                       teacher_text=teacher_text))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch_size / (time.perf_counter() - start)


def concurrent_runners(config, tokenizer, trainer, batch, mesh, block_steps: int,
                       block_warm: int, teacher_text=None) -> tuple[dict, prefetch.Prefetch]:
  """Blocks of train steps fed by the real loader, prefetching as a run does
  (data/prefetch.py), and the same blocks on one fixed device batch (the step alone). Each
  block drains the loader's queue first (`block_warm` steps, at least prefetch + 1, untimed,
  in both; `teacher_text` as in loader_rate). Returns the two programs and the prefetching
  iterator (to close)."""
  depth = config.data.get('prefetch', 0)
  loader = pipeline.make_train_loader(config.data, tokenizer, global_batch_size=config.batch_size,
                                      seed=0, process_index=0, process_count=1,
                                      teacher_text=teacher_text)
  batches = prefetch.Prefetch(iter(loader), lambda b: sharding_lib.global_batch(b, mesh), depth)
  warm = max(block_warm, depth + 1)
  return {'step_alone': timing.block_runner(timing.step_runner(trainer, batch),
                                            block_steps, warm),
          'step_loader': timing.block_runner(timing.step_runner(trainer, batches=batches),
                                             block_steps, warm)}, batches
