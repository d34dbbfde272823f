"""TFDS builder of the synthetic "shapes" dataset (array_record), and its tokenizer.

Owns the on-disk layout: `<data_dir>/shapes/<config>/<version>/` holds the array_record shards
and `spm/shapes.model`, the SentencePiece model trained on the train captions and QA texts.
Both are written inside TFDS's `incomplete.*` directory, which is renamed when the build ends,
so an interrupted build never looks complete and the dataset never exists without its tokenizer.
Records are stored in id order (no TFDS shuffling; grain shuffles), so `source[i]["id"] == i`.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import itertools
import multiprocessing
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from clusterstm_jax.data import shapes, tokenizer
from clusterstm_jax.errors import UserError

TOKENIZER_RELPATH = os.path.join("spm", "shapes.model")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 20000
  num_val: int = 1000
  num_test: int = 1000
  num_frames: int = 8
  image_size: int = 64
  seed: int = 0
  pair_fraction: float = 0.5  # share of clips that come with a motion-only partner
  # Transient distractors per clip, at most (0 = none): shapes in 1-2 frames that no text
  # mentions (shapes.add_distractors). The clips' objects, texts and tokenizer do not change.
  distractors: int = 0
  # Transient stains per clip, at most (0 = none): patches of the background a little brighter
  # or darker in 1-2 frames (shapes.add_stains), transient content that shares a cluster with
  # the background. The clips' objects, texts and tokenizer do not change.
  stains: int = 0
  vocab_size: int = 256
  jpeg_quality: int = 90
  # Render+encode worker processes (None = one per CPU, beside this process that serialises
  # and writes). Splits smaller than min_parallel are made in-process (workers take ~1 s to start).
  workers: int | None = None
  min_parallel: int = 2048


def _strings(shape=(None,)):
  # Byte-string tensors: ~60x faster to serialise than uint8 image tensors, and a 1-D one is
  # ~3x faster than a tfds Sequence (no ragged bookkeeping). They read back as bytes.
  return tfds.features.Tensor(shape=shape, dtype=np.object_)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes moving over textured backgrounds, with captions and QA pairs."""

  # tfds 4.9.10 looks up a checksums file next to the code through `importlib_resources`, which
  # it only installs for Python < 3.9; this builder downloads nothing, so there is no such file.
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="20000/1000/1000 clips of 8 frames, 64x64."),
      ShapesConfig(name="tiny", description="512/64/64 clips, for tests.",
                   num_train=512, num_val=64, num_test=64),
      ShapesConfig(name="distractors", description="The default clips, each with 1-2 transient "
                   "distractors (in 1-2 frames, in no caption or question).", distractors=2),
      ShapesConfig(name="tiny_distractors", description="The tiny clips with distractors.",
                   num_train=512, num_val=64, num_test=64, distractors=2),
      ShapesConfig(name="transients", description="The default clips, each with 1-2 transient "
                   "stains (background a little brighter or darker, in 1-2 frames, in no text).",
                   stains=2),
      ShapesConfig(name="tiny_transients", description="The tiny clips with transient stains.",
                   num_train=512, num_val=64, num_test=64, stains=2),
  ]

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": np.int32,  # index within the split, as made by shapes.split_scenes
            "pair": np.int32,  # id of the motion-only partner, -1 if none
            "frames": _strings(),  # one JPEG per frame
            "labels": _strings(()),  # PNG strip of the label maps, [T*H, W]
            "caption": tfds.features.Text(),
            "questions": _strings(),  # questions[k] is answered by answers[k]
            "answers": _strings(),
            # Per object, in draw order (label k+1 is objects[k]).
            "objects": {k: _strings() for k in ("colour", "size", "shape", "motion")},
        }),
        description=__doc__,
        disable_shuffling=True,  # ids stay in order; shuffling is grain's job
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    # Train scenes are sampled once, for the tokenizer and for the examples.
    train = list(split_items(cfg, "train"))
    # Runs inside the incomplete.* build dir (self.data_dir points there during the build).
    tokenizer.train_sentencepiece(tokenizer_texts(item[2] for item in train),
                                  os.path.join(self.data_dir, TOKENIZER_RELPATH), cfg.vocab_size)
    return {"train": self._generate_examples(train, cfg.num_train),
            "val": self._generate_examples(split_items(cfg, "val"), cfg.num_val),
            "test": self._generate_examples(split_items(cfg, "test"), cfg.num_test)}

  def _generate_examples(self, items: Iterable[tuple[int, int, shapes.Scene]], num: int):
    cfg = self.builder_config
    workers = (os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    encode = functools.partial(shapes.render_encoded, jpeg_quality=cfg.jpeg_quality)
    for (i, pair, scene), (jpegs, png) in _ordered_map(
        encode, items, lambda item: item[2], workers if num >= cfg.min_parallel else 0):
      yield i, {"id": i, "pair": pair, "frames": jpegs, "labels": png, **shapes.describe(scene)}


def split_items(cfg: ShapesConfig, split: str) -> Iterator[tuple[int, int, shapes.Scene]]:
  num = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}[split]
  return shapes.split_scenes(split, num, cfg.seed, num_frames=cfg.num_frames,
                             size=cfg.image_size, pair_fraction=cfg.pair_fraction,
                             distractors=cfg.distractors, stains=cfg.stains)


def _ordered_map(fn: Callable, items: Iterable, arg: Callable, workers: int,
                 chunk: int = 256) -> Iterator[tuple]:
  """Yields (item, fn(arg(item))) in order; with workers, fn runs in a process pool.

  The pool works one chunk ahead of the consumer (TFDS serialising and writing in this
  process), so memory stays bounded. Spawned, not forked: the caller may hold JAX threads.
  """
  if workers < 1:
    for item in items:
      yield item, fn(arg(item))
    return
  items = iter(items)
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    current = list(itertools.islice(items, chunk))
    pending = pool.map_async(fn, [arg(x) for x in current], chunksize=16)
    while current:
      results = pending.get()
      upcoming = list(itertools.islice(items, chunk))
      if upcoming:
        pending = pool.map_async(fn, [arg(x) for x in upcoming], chunksize=16)
      yield from zip(current, results)
      current = upcoming


def tokenizer_texts(scenes: Iterable[shapes.Scene]) -> list[str]:
  """Captions, then the distinct question/answer texts (they repeat a lot)."""
  captions, qa = [], set()
  for scene in scenes:
    captions.append(shapes.caption(scene))
    for q, a in shapes.questions(scene):
      qa.update((q, a))
  return captions + sorted(qa)


def ensure_shapes(data_dir: str | os.PathLike, config_name: str = "default") -> tuple[Shapes, str]:
  """Builds the dataset on first use (seconds for 'tiny', about a minute for 'default').

  Returns the builder and the path of its tokenizer model. A file lock serialises processes of
  one machine that call this at the same time (e.g. two local jax processes).
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  names = [c.name for c in Shapes.BUILDER_CONFIGS]
  if config_name not in names:
    raise UserError(f"unknown shapes builder config {config_name!r}; expected one of {names}")
  builder = Shapes(data_dir=data_dir, config=config_name)
  model_path = os.path.join(builder.data_dir, TOKENIZER_RELPATH)
  if os.path.isfile(model_path):  # only a finished build has it (it moves with the renamed dir)
    return builder, model_path
  root = os.path.join(data_dir, "shapes")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{config_name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    builder = Shapes(data_dir=data_dir, config=config_name)  # another process may have built it
    if not os.path.isdir(builder.data_dir):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    elif not os.path.isfile(model_path):  # defensive: a dataset dir without its tokenizer
      cfg = builder.builder_config
      tokenizer.train_sentencepiece(tokenizer_texts(item[2] for item in split_items(cfg, "train")),
                                    model_path, cfg.vocab_size)
  return builder, model_path
