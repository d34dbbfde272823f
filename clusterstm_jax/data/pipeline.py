"""Host input pipeline: random-access sources -> grain loaders of fixed-shape numpy batches.

Owns the data config (`default_data_config`), which source and tokenizer a config names, the
per-example decoding (JPEG frames, frame sampling, resize, label maps, tokenised caption) and
how examples are split over processes: the train loader shuffles, repeats and shards with grain
(its iterator state is checkpointable); the eval loader visits every example exactly once
across processes, padding the last global batch with rows marked `valid=False`.

A batch is a dict of numpy arrays, b = global_batch_size / process_count:
  video uint8 [b, T, H, W, 3] (normalised on device), text int32 [b, L],
  labels uint8 [b, T, H, W] (object ids, 0 = background; zeros for data without label maps),
  index int32 [b] (example id), and for eval also valid bool [b]; with a teacher tokenizer
  (pretraining with a teacher) also teacher_text int32 [b, Lt]: the same caption in the
  teacher's own ids (its tokenizer, conventions and length), which its text tower encodes.
"""
from __future__ import annotations

import math
import os
from typing import Any

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from clusterstm_jax.data import examples as examples_lib
from clusterstm_jax.data import prefetch
from clusterstm_jax.data import video_io
from clusterstm_jax.data.tokenizer import Tokenizer
from clusterstm_jax.data.tokenizer import open_tokenizer
from clusterstm_jax.errors import UserError


def default_data_config() -> ml_collections.ConfigDict:
  """Data fields shared by every config (`config.data = default_data_config()`)."""
  return ml_collections.ConfigDict({
      "name": "shapes",
      "data_dir": os.environ.get("CLUSTERSTM_DATA_DIR", "~/.cache/clusterstm_jax/data"),
      # shapes: 'default' (20000/1000/1000), 'tiny' (512/64/64), and each with transient
      # distractors: 'distractors', 'tiny_distractors', or transient stains: 'transients',
      # 'tiny_transients'
      "builder_config": "default",
      "num_frames": 4,
      "image_size": 64,
      "max_text_len": 32,
      # grain worker processes decoding in parallel; -1 = from the host's cores (all but 2,
      # at most 32: data/prefetch.py; what configs/pretrain.py runs); 0 = decode in the
      # training process (in its prefetch thread), as tests and tools do.
      "worker_count": 0,
      "worker_buffer_size": 2,  # batches each worker makes ahead
      # Batches the training loop's thread makes (and puts on the devices) ahead of the step,
      # overlapping decoding and the host-to-device copy with it; 0 = in series (data/prefetch.py).
      "prefetch": 2,
      # Threads reading records ahead (per process or worker). 0 reads in the decoding thread:
      # fastest for local array_record on few cores (grain's 16 threads/500 records cost 2.5x
      # here); raise for remote storage (GCS) on many-core hosts.
      "read_threads": 0,
      "read_buffer_size": 256,
      "train_split": "train",
      "eval_split": "test",
      # A SentencePiece .model or a BERT WordPiece vocab.txt (tokenizer.open_tokenizer tells
      # them apart); '' = the one trained with shapes.
      "tokenizer": "",
      # Multi-caption datasets: 'pairs' trains on every (video, caption) pair, 'sample' on one
      # caption drawn per visit of a video (data/examples.py).
      "captions": "pairs",
  })


def _data_dir(data_config) -> str:
  return os.path.expanduser(data_config.data_dir)


def check_data_dir(data_config) -> None:
  """config.data.data_dir before any build: set; a directory; for shapes (built on first use)
  creatable; for the real datasets existing (their sources are read from <data_dir>/manual)."""
  if not data_config.data_dir:
    raise UserError("config.data.data_dir is empty")
  path = _data_dir(data_config)
  if "://" in path:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"config.data.data_dir={path} is a file, not a directory")
  if data_config.name != "shapes" and not os.path.isdir(path):
    raise UserError(f"config.data.data_dir={path} does not exist (see docs/datasets.md)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing != path and not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
    raise UserError(f"config.data.data_dir={path} does not exist and cannot be created "
                    f"({existing} is not a writable directory)")
  if data_config.tokenizer:
    tokenizer_path(data_config)


def _builder(data_config):
  """The config's prepared TFDS builder; builds it on first use."""
  name, data_dir = data_config.name, _data_dir(data_config)
  if name == "shapes":
    # lazy: TFDS builders load only when a dataset is built
    from clusterstm_jax.data.builders.shapes import ensure_shapes

    return ensure_shapes(data_dir, data_config.builder_config)[0]
  # lazy: TFDS builders load only when a dataset is built
  from clusterstm_jax.data.builders import real

  if name not in real.REAL_DATASETS:
    raise UserError(f"unknown dataset {name!r}; expected one of {['shapes', *real.REAL_DATASETS]}")
  builder = real.get_builder(name, data_dir, data_config.builder_config or None)
  # Reads <data_dir>/manual/<name> on first use; a missing one is a one-line error naming it.
  builder.download_and_prepare()
  return builder


def get_source(data_config, split: str):
  """Random-access source of one split: len() and [i] -> dict of numpy arrays / bytes."""
  builder = _builder(data_config)
  if split not in builder.info.splits:
    raise UserError(f"dataset {data_config.name!r} has no split {split!r}; "
                    f"it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split)


def train_source(data_config, examples: str = "captions", *, announce: bool = True):
  """The training examples of config.data's train split (data/examples.py)."""
  return examples_lib.examples(
      get_source(data_config, data_config.train_split), examples,
      multi_caption=getattr(_builder(data_config), "MULTI_CAPTION", False),
      captions=data_config.get("captions", "pairs"), announce=announce,
      what=f"{data_config.name} {data_config.train_split}")


def eval_all_captions(data_config) -> bool:
  """Whether the dataset's retrieval protocol ranks every caption of a video (MSVD)."""
  return data_config.name != "shapes" and getattr(_builder(data_config), "EVAL_ALL_CAPTIONS",
                                                  False)


def split_coverage(data_config, split: str) -> tuple[int, int]:
  """(records stored, items the annotations list) of a built split: the difference is what the
  build skipped (missing or unreadable media, in the builder's skipped.json)."""
  builder = _builder(data_config)
  report = builder.skipped().get(split) if hasattr(builder, "skipped") else None
  kept = builder.info.splits[split].num_examples
  return kept, (report["total"] if report else kept)


def tokenizer_path(data_config) -> str:
  """The sentencepiece model a config uses: its `tokenizer` path, or the one built with shapes."""
  if data_config.tokenizer:
    path = os.path.expanduser(data_config.tokenizer)
    if not os.path.isfile(path):
      raise UserError(f"tokenizer model not found: {path} (config.data.tokenizer)")
    return path
  if data_config.name == "folder":  # trained on the folder's own captions at build time
    # lazy: TFDS builders load only when used
    from clusterstm_jax.data.builders import folder

    return folder.tokenizer_path(_builder(data_config))
  if data_config.name != "shapes":
    raise UserError(f"dataset {data_config.name!r} needs config.data.tokenizer "
                    "(a sentencepiece .model path)")
  # lazy: TFDS builders load only when used
  from clusterstm_jax.data.builders.shapes import ensure_shapes

  return ensure_shapes(_data_dir(data_config), data_config.builder_config)[1]


def get_tokenizer(data_config) -> Tokenizer:
  """The student's tokenizer (SentencePiece or WordPiece, [CLS] first, pad 0)."""
  return open_tokenizer(tokenizer_path(data_config))


def _crop_square(images: np.ndarray, rng: np.random.Generator | None):
  """Square crop of [T, H, W, ...] frames: centred, or at a random offset along the long side.

  Returns the crop and its row and column slices (to crop label maps the same way).
  """
  h, w = images.shape[1:3]
  if h == w:
    return images, slice(None), slice(None)
  side = min(h, w)
  off = (max(h, w) - side) // 2 if rng is None else int(rng.integers(0, max(h, w) - side + 1))
  rows = slice(off, off + side) if h > w else slice(0, h)
  cols = slice(off, off + side) if w > h else slice(0, w)
  return images[:, rows, cols], rows, cols


def eval_frames(frames: np.ndarray, num_frames: int, image_size: int) -> np.ndarray:
  """Decoded frames uint8 [N, H, W, 3] -> the model's input [num_frames, size, size, 3], as the
  eval loader makes it: the middle frame of each segment, a centred square, resized."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise UserError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                    f"{list(frames.shape)}")
  video = frames[video_io.sample_frame_indices(len(frames), num_frames)]
  return video_io.resize(_crop_square(video, None)[0], image_size)


def decode_example(ex: dict[str, Any], *, tokenizer: Tokenizer, num_frames: int, image_size: int,
                   max_text_len: int, rng: np.random.Generator | None,
                   teacher_tokenizer: Tokenizer | None = None, teacher_text_len: int = 0,
                   view: tuple | None = None) -> dict[str, np.ndarray]:
  """One stored example -> fixed-shape arrays.

  rng=None (eval) takes the middle frame of each segment and a centred crop; an rng (train)
  jitters both. Either way the result depends only on the example and the rng. `view`: given
  (frame indices [T], square crop (top, left, side)) instead (the teacher cache's views). A
  `teacher_tokenizer` adds `teacher_text`: the caption in the teacher's ids, teacher_text_len long.
  """
  jpegs = ex["frames"]
  if view is None:
    idx = video_io.sample_frame_indices(len(jpegs), num_frames, rng)
  else:
    idx = np.asarray(view[0])
  decoded = {i: video_io.decode_jpeg(jpegs[i]) for i in set(idx.tolist())}  # repeats decode once
  # Real frames keep their aspect ratio (short side stored): crop a square, then resize.
  video = np.stack([decoded[i] for i in idx.tolist()])
  if view is None:
    video, rows, cols = _crop_square(video, rng)
  else:
    top, left, side = (int(x) for x in view[1])
    rows, cols = slice(top, top + side), slice(left, left + side)
    video = video[:, rows, cols]
  video = video_io.resize(video, image_size)
  if ex.get("labels") is not None:
    labels = video_io.decode_label_strip(ex["labels"], len(jpegs))[idx][:, rows, cols]
    labels = video_io.resize(labels, image_size, nearest=True)
  else:  # real data has no object label maps
    labels = np.zeros(video.shape[:-1], np.uint8)
  out = {
      "video": video,
      "text": tokenizer.encode_batch([ex["caption"]], max_text_len)[0],
      "labels": labels,
      "index": np.int32(ex["id"]),
  }
  if teacher_tokenizer is not None:
    out["teacher_text"] = teacher_tokenizer.encode_batch([ex["caption"]], teacher_text_len)[0]
  return out


class _TrainDecode(grain.RandomMapTransform):
  """Temporal jitter from grain's per-record rng (seed + position): deterministic and resumable."""

  def __init__(self, decode=decode_example, **kwargs):
    self._decode, self._kwargs = decode, kwargs

  def random_map(self, element, rng: np.random.Generator):
    return self._decode(examples_lib.pick_caption(dict(element), rng), rng=rng, **self._kwargs)


class _EvalDecode(grain.MapTransform):

  def __init__(self, decode=decode_example, **kwargs):
    self._decode, self._kwargs = decode, kwargs

  def map(self, element):
    out = self._decode(element, rng=None, **self._kwargs)
    out["valid"] = np.bool_(element["valid"])
    return out


class _EvalShard:
  """This process's rows of an eval split, padded to whole global batches.

  Global batch s holds split positions [s*B, (s+1)*B); process p takes its contiguous block
  [s*B + p*b, s*B + (p+1)*b). Positions past the end repeat the last example with valid=False,
  so every process runs the same number of batches and each example is valid exactly once.
  """

  def __init__(self, source, global_batch_size: int, process_index: int, process_count: int):
    self._source, self._n = source, len(source)
    self._gb, self._p = global_batch_size, process_index
    self._b = global_batch_size // process_count
    self._len = math.ceil(self._n / global_batch_size) * self._b

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, j: int) -> dict[str, Any]:
    pos = (j // self._b) * self._gb + self._p * self._b + j % self._b
    ex = dict(self._source[min(pos, self._n - 1)])
    ex["valid"] = pos < self._n
    return ex


def default_image_config() -> ml_collections.ConfigDict:
  """The image stream of pretraining (`config.images`): whole batches of T = 1 examples
  alternating with the video batches, as UMT alternates CC3M images with WebVid videos."""
  return ml_collections.ConfigDict({
      "every": 0,  # every k-th step (k >= 2) is an image step; 0 = no image stream
      # The dataset and split of the images; they share config.data's data_dir, image_size,
      # text length and tokenizer. 'cc3m' for real data. A video dataset works too: one frame per
      # clip, drawn from the loader's seeded per-example rng (shapes' stand-in for CC3M).
      "name": "shapes",
      "builder_config": "",  # '' = config.data's when it is the same dataset, else 'default'
      "split": "train",
      "batch_size": -1,  # global; -1 = config.batch_size
      # The masked fraction of an image's tokens; -1 = config.mask.ratio (UMT masks images
      # less than videos: one frame holds less redundancy than four).
      "mask_ratio": -1.0,
  })


def image_data_config(config) -> ml_collections.ConfigDict:
  """config.data turned into the image stream's data config: its dataset and split, T = 1."""
  images, data = config.images, config.data.copy_and_resolve_references()
  same = images.name == data.name
  data.builder_config = images.builder_config or (data.builder_config if same else "default")
  data.name = images.name
  data.train_split = images.split
  # One frame per example: decode_example's train rng picks a uniformly random frame of a clip
  # (its single segment); an image record has exactly one.
  data.num_frames = 1
  return data


def _check_batch(global_batch_size: int, process_index: int, process_count: int):
  if global_batch_size < 1 or global_batch_size % process_count:
    raise UserError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")


def _decode_kwargs(data_config, tokenizer: Tokenizer, teacher_text=None) -> dict[str, Any]:
  kwargs = {"tokenizer": tokenizer, "num_frames": data_config.num_frames,
            "image_size": data_config.image_size, "max_text_len": data_config.max_text_len}
  if teacher_text is not None:  # (the teacher's tokenizer, its text length)
    kwargs["teacher_tokenizer"], kwargs["teacher_text_len"] = teacher_text
  return kwargs


def _read_options(data_config) -> grain.ReadOptions:
  # .get: configs saved before these fields existed (restored from checkpoints) still load.
  threads = data_config.get("read_threads", 0)
  buffer = data_config.get("read_buffer_size", 256) if threads else 0
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def _loader_kwargs(data_config) -> dict[str, Any]:
  """grain.DataLoader's parallelism arguments of a data config (.get: configs saved before these
  fields existed, restored from checkpoints, still load)."""
  workers = prefetch.resolve_worker_count(data_config.get("worker_count", 0))
  _ensure_flags_parsed(workers)
  return dict(worker_count=workers, worker_buffer_size=data_config.get("worker_buffer_size", 1),
              read_options=_read_options(data_config))


def _ensure_flags_parsed(worker_count: int):
  # grain's worker processes read absl flags; a library caller (tests, notebooks) never parsed them.
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(data_config, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                      process_index: int, process_count: int, decode=decode_example,
                      examples: str = "captions", source=None,
                      teacher_text: tuple[Tokenizer, int] | None = None) -> grain.DataLoader:
  """Shuffled, repeating, per-process sharded loader; `iter()` gives a checkpointable iterator.

  `decode` (decode_example's signature, picklable) makes one example; downstream tasks add fields.
  `examples`: what one example of a record is (data/examples.py: every caption by default);
  `source`: train_source's result when the caller has it already; `teacher_text`: (the
  teacher's tokenizer, its text length) adds the `teacher_text` stream (pretraining with a teacher).
  """
  _check_batch(global_batch_size, process_index, process_count)
  if not 0 <= seed < 2**32:
    raise UserError(f"seed must be in [0, 2**32) for grain, got {seed}")
  if source is None:
    source = train_source(data_config, examples, announce=process_index == 0)
  shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                             drop_remainder=True)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=True, num_epochs=None,
                               seed=seed)
  return grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[_TrainDecode(decode, **_decode_kwargs(data_config, tokenizer, teacher_text)),
                  grain.Batch(global_batch_size // process_count, drop_remainder=True)],
      **_loader_kwargs(data_config))


def make_eval_loader(data_config, tokenizer: Tokenizer, *, split: str | None = None,
                     global_batch_size: int, process_index: int, process_count: int,
                     decode=decode_example, examples: str = "records") -> grain.DataLoader:
  """One ordered pass over `split` (default data_config.eval_split); see _EvalShard for padding.
  `decode` as in make_train_loader (called with rng=None); `examples` as there (default: each
  record once, its `caption` being the benchmark's text)."""
  _check_batch(global_batch_size, process_index, process_count)
  split = split or data_config.eval_split
  source = examples_lib.examples(get_source(data_config, split), examples, announce=False,
                                 what=f"{data_config.name} {split}")
  source = _EvalShard(source, global_batch_size, process_index, process_count)
  return grain.DataLoader(
      data_source=source,
      sampler=grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=False,
                                 num_epochs=1),
      shard_options=grain.NoSharding(),
      operations=[_EvalDecode(decode, **_decode_kwargs(data_config, tokenizer)),
                  grain.Batch(global_batch_size // process_count, drop_remainder=True)],
      **_loader_kwargs(data_config))
