"""Shared machinery of the real-dataset TFDS builders (array_record, no TensorFlow).

Owns the builder config (frames per video, frame size, JPEG quality), the stored features, the
manual-directory check, in-order generation with a count of skipped media, and helpers that find
annotation and media files in a manual dir.

Stored example (every real dataset; records in generation order, so `source[i]["id"] == i`):
  id int32, video_id Text (the dataset's own id), frames [T] JPEG bytes (short side =
  image_size, aspect kept; T = 1 for images), caption Text (the retrieval/captioning target),
  captions [K] bytes (every caption of the video). QA configs add questions, answers [Q] bytes
  and question_ids [Q] int64; paragraph datasets add segments float32 [K, 2] (seconds).

Media that are missing, corrupt or unreadable are skipped and counted: the counts and the first
ids go to the log and to `skipped.json` in the dataset directory (`builder.skipped()`). It is
written inside TFDS's `incomplete.*` directory, which is renamed only when the build ends, so
an interrupted build leaves nothing that reads as prepared.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import fcntl
import itertools
import json
import multiprocessing
import os
import re
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from clusterstm_jax.data import builders
from clusterstm_jax.data.builders import media
from clusterstm_jax.errors import UserError

SKIPPED_FILE = "skipped.json"
MAX_REPORTED = 10  # skipped ids listed per split


@dataclasses.dataclass(eq=False)
class RealConfig(tfds.core.BuilderConfig):
  """What is stored. Each field changes the records, so a custom value needs a new config name."""
  task: str = ""  # the annotation protocol, per dataset (e.g. msrvtt: '1ka', 'official', 'qa')
  num_frames: int = 8  # uniformly sampled at build time (segment middles)
  image_size: int = 224  # short side of the stored frames
  jpeg_quality: int = 90


@dataclasses.dataclass
class Item:
  """One video (or image) to store: its id, its file (None: not found) and its texts."""
  video_id: str
  path: str | None
  features: dict[str, Any]


def strings(shape=(None,)):
  # Same convention as the shapes builder: byte-string tensors, fast to serialise; read as bytes.
  return tfds.features.Tensor(shape=shape, dtype=np.object_)


def qa_features() -> dict:
  return {"questions": strings(), "answers": strings(),
          "question_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64)}


def segment_features() -> dict:
  return {"segments": tfds.features.Tensor(shape=(None, 2), dtype=np.float32)}


class RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the real-dataset builders: subclasses parse annotations into Items per split."""

  code_path = None  # no checksums file (see builders/__init__.py)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  HUMAN_NAME = ""  # e.g. "MSR-VTT", used in messages
  HOMEPAGE = ""
  IS_IMAGE = False  # True: each file is one image, stored as a 1-frame example
  # Split names per config task ('*': any task), known before a build; splits marked optional
  # exist only when their annotation file does. EVAL_SPLIT: the benchmark's test split.
  SPLITS: dict[str, tuple[str, ...]] = {"*": ("train", "val", "test")}
  OPTIONAL_SPLITS: tuple[str, ...] = ()
  EVAL_SPLIT = "test"
  EVAL_ALL_CAPTIONS = False  # retrieval's queries: every caption, not the record's `caption`
  MULTI_CAPTION = False  # records hold several captions, each a training pair (data/examples.py)

  def __init__(self, *, workers: int | None = None, chunk: int = 64,
               file_format: str = "array_record", **kwargs):
    """workers: decode processes (None: CPUs - 1; 0: decode in this process); chunk: files
    handed to the pool at a time (bounds memory). Neither changes what is stored."""
    super().__init__(file_format=file_format, **kwargs)
    self._workers = max(0, (os.cpu_count() or 1) - 1) if workers is None else workers
    self._chunk = chunk
    self._skipped: dict[str, dict] = {}  # split -> skip report of the build in progress
    self._pool = None  # decode processes, alive during download_and_prepare

  # ----- to implement -----
  @abc.abstractmethod
  def _split_items(self, root: str) -> dict[str, Iterable[Item]]:
    """Parses the annotations under the manual dir `root`: split name -> Items, in order.

    Raises UserError (see require_file) when a needed file is missing; may return lazy
    iterables (e.g. a CSV read row by row).
    """

  def _extra_features(self) -> dict:
    return {}

  def split_names(self) -> tuple[str, ...]:
    """The splits of this config: the built ones once built, else the declared ones."""
    if self.data_path.exists():
      if not self.info.splits:
        self.info.read_from_directory(self.data_dir)
      return tuple(self.info.splits)
    return self.SPLITS.get(self.builder_config.task, self.SPLITS["*"])

  # ----- TFDS hooks -----
  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": np.int32, "video_id": tfds.features.Text(), "frames": strings(),
            "caption": tfds.features.Text(), "captions": strings(), **self._extra_features()}),
        description=self.__doc__, homepage=self.HOMEPAGE or None,
        disable_shuffling=True)  # records stay in order; shuffling is grain's job

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """Builds from the manual dir (default `<data_dir>/manual/<name>`); no-op once built.

    Processes of one machine that call this together build once: a file lock serialises them
    (local data dirs), and a builder made before another process finished reads that build.
    """
    config = download_config or tfds.download.DownloadConfig()
    manual = os.fspath(config.manual_dir or builders.manual_dir(os.fspath(self.data_dir_root), self.name))
    with _build_lock(os.fspath(self.data_dir_root), self.name, self.builder_config.name):
      if self.data_path.exists() and not config.download_mode.overwrite_dataset:
        if not self.info.splits:  # built by another process after this builder was made
          self.info.read_from_directory(self.data_dir)
        return
      check_manual_dir(self.HUMAN_NAME or self.name, manual)
      self._skipped = {}
      # One decode pool for all splits: each spawned worker re-imports the main module.
      self._pool = DecodePool(self._workers) if self._workers > 0 else None
      try:
        super().download_and_prepare(
            download_dir=download_dir,
            download_config=dataclasses.replace(config, manual_dir=manual, try_download_gcs=False),
            **kwargs)
      finally:
        if self._pool is not None:
          self._pool.close()
        self._pool = None
    logging.info("%s: built %s; %s", self.name, self.data_dir, summary(self._skipped))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, items)
            for split, items in self._split_items(os.fspath(dl_manager.manual_dir)).items()}

  def _generate_examples(self, split: str, items: Iterable[Item]) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    kept, total, missing, unreadable, first = 0, 0, 0, 0, []
    tasks = ((item, media.MediaTask(item.path or "", self.IS_IMAGE, cfg.num_frames,
                                    cfg.image_size, cfg.jpeg_quality)) for item in items)
    for item, (jpegs, error) in _ordered_load(tasks, self._pool, self._chunk):
      total += 1
      if jpegs is None:
        missing += error == media.MISSING
        unreadable += error != media.MISSING
        if len(first) < MAX_REPORTED:
          first.append({"video_id": item.video_id, "path": item.path, "reason": error})
        continue
      yield kept, {"id": kept, "video_id": item.video_id, "frames": jpegs, **item.features}
      kept += 1
    self._skipped[split] = {"total": total, "kept": kept, "skipped": missing + unreadable,
                            "missing": missing, "unreadable": unreadable, "first": first}
    # self.data_dir is TFDS's incomplete.* dir here: the report moves with the finished dataset.
    (epath.Path(self.data_dir) / SKIPPED_FILE).write_text(json.dumps(self._skipped, indent=1))
    if missing + unreadable:
      logging.warning("%s/%s: skipped %d of %d files (%d missing, %d unreadable); first: %s",
                      self.name, split, missing + unreadable, total, missing, unreadable,
                      ", ".join(f"{s['video_id']} ({s['reason']})" for s in first[:3]))
    if kept == 0:
      where = (f"; first: {first[0]['video_id']} at {first[0]['path']} ({first[0]['reason']})"
               if first else "")
      raise UserError(f"{self.HUMAN_NAME}: split {split!r} has no usable media "
                      f"({total} listed in the annotations){where}; check the layout in docs/datasets.md")

  def skipped(self) -> dict:
    """The skip report of the finished build: split -> {total, kept, skipped, missing,
    unreadable, first: [{video_id, path, reason}]}; {} when not built."""
    path = epath.Path(self.data_dir) / SKIPPED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def _build_lock(root: str, name: str, config: str):
  if "://" in root:  # a bucket: no file locks; build once beforehand (docs/datasets.md)
    yield
    return
  os.makedirs(os.path.join(root, name), exist_ok=True)
  with open(os.path.join(root, name, f".{config}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    yield


def summary(report: dict) -> str:
  """One line per build: kept/total per split and what was skipped."""
  parts = [f"{split}: kept {r['kept']}/{r['total']}"
           + (f" (skipped {r['missing']} missing, {r['unreadable']} unreadable)" if r["skipped"] else "")
           for split, r in report.items()]
  return "; ".join(parts) + f" (details in {SKIPPED_FILE})"


class DecodePool:
  """Spawned processes that run `fn` (default media.load_media) on MediaTasks.

  A worker that dies (a decoder crash on a bad file) costs only that file: the chunk is retried
  one file at a time in a fresh pool, and the file that kills a worker again is reported as
  unreadable. Spawned, not forked: the caller may hold JAX or TFDS threads.
  """

  CRASHED = "the decoder crashed (its worker process died)"

  def __init__(self, workers: int, fn=media.load_media):
    self._workers, self._fn, self._executor = workers, fn, None

  def submit(self, tasks: list) -> list:
    if self._executor is None:
      self._executor = futures.ProcessPoolExecutor(
          self._workers, mp_context=multiprocessing.get_context("spawn"))
    return [self._executor.submit(self._fn, t) for t in tasks]

  def results(self, pending: list, tasks: list) -> list:
    try:
      return [f.result() for f in pending]
    except BrokenProcessPool:
      self.close(wait=False)
    out = []
    for task in tasks:  # one at a time, so a crash points at its file
      try:
        out.append(self.submit([task])[0].result())
      except BrokenProcessPool:
        self.close(wait=False)
        out.append((None, self.CRASHED))
    return out

  def close(self, wait: bool = True):
    if self._executor is not None:
      self._executor.shutdown(wait=wait, cancel_futures=True)
      self._executor = None


def _ordered_load(tasks: Iterable[tuple[Item, media.MediaTask]], pool: DecodePool | None,
                  chunk: int) -> Iterator[tuple[Item, tuple]]:
  """Yields (item, load_media(task)) in order. With a pool, decoding runs one chunk ahead of
  the consumer (which serialises and writes), so memory stays bounded."""
  if pool is None:
    for item, task in tasks:
      yield item, media.load_media(task)
    return
  tasks = iter(tasks)
  current = list(itertools.islice(tasks, chunk))
  pending = pool.submit([t for _, t in current])
  while current:
    results = pool.results(pending, [t for _, t in current])
    upcoming = list(itertools.islice(tasks, chunk))
    if upcoming:
      pending = pool.submit([t for _, t in upcoming])
    yield from zip((item for item, _ in current), results)
    current = upcoming


# ----- helpers for the dataset modules -----

def check_manual_dir(dataset: str, path: str):
  if not os.path.isdir(path) or not os.listdir(path):
    raise UserError(f"{dataset}: the manual download directory {path} is missing or empty; "
                    "download the files by hand and lay them out as docs/datasets.md says")


def locate(videos: dict[str, str], keys: Sequence[str], expected: str) -> str:
  """The indexed file of the first of `keys` found in `videos` (index_files), else `expected`:
  the path where the file should be, which the build reports as missing (skipped.json)."""
  for key in keys:
    if key in videos:
      return videos[key]
  return expected


def find_file(root: str, candidates: Sequence[str]) -> str | None:
  """The first of `candidates` (paths relative to root) that exists."""
  for rel in candidates:
    path = os.path.join(root, rel)
    if os.path.isfile(path):
      return path
  return None


def require_file(dataset: str, root: str, candidates: Sequence[str], what: str) -> str:
  path = find_file(root, candidates)
  if path is None:
    alternatives = f" (or {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
    raise UserError(f"{dataset}: {what} not found: expected {os.path.join(root, candidates[0])}"
                    f"{alternatives}")
  return path


def require_dir(dataset: str, root: str, rel: str, what: str) -> str:
  path = os.path.join(root, rel)
  if not os.path.isdir(path):
    raise UserError(f"{dataset}: {what} not found: expected the directory {path}")
  return path


def load_json(dataset: str, path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{dataset}: cannot read {path}: {e}") from e


def walk(directory: str):
  """os.walk following symlinks, each real directory once: a symlink cycle (a link to a parent)
  ends instead of looping forever."""
  seen = set()
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames
                         if os.path.realpath(os.path.join(dirpath, d)) not in seen)
    yield dirpath, dirnames, filenames


def index_files(directory: str, extensions: Sequence[str] = media.VIDEO_EXTENSIONS) -> dict[str, str]:
  """File stem -> path for every file with one of `extensions` under `directory` (recursive).

  On a stem found twice, .mp4 wins, then the first in sorted order (deterministic).
  """
  out: dict[str, str] = {}
  for dirpath, _, filenames in walk(directory):
    for name in sorted(filenames):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in extensions:
        continue
      if stem not in out or (ext.lower() == ".mp4" and not out[stem].lower().endswith(".mp4")):
        out[stem] = os.path.join(dirpath, name)
  return out


def natural_key(text: str) -> tuple:
  """Sort key that puts 'video9' before 'video10'."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def text_features(captions: Sequence[str], caption: str | None = None) -> dict[str, Any]:
  """caption (default: the first caption, '' if none) and captions, cleaned of outer spaces."""
  captions = [c.strip() for c in captions]
  return {"caption": (captions[0] if captions else "") if caption is None else caption.strip(),
          "captions": np.array(captions, dtype=object)}


def group_qa(dataset: str, path: str, video_of) -> dict[str, dict[str, list]]:
  """A QA json (a list of {question, answer, id, video_id | video}) grouped by video.

  video_of maps an entry's video field to the dataset's video id. Returns video id ->
  {questions, answers, question_ids} in file order; an entry without `id` gets its position.
  """
  entries = load_json(dataset, path)
  if not isinstance(entries, list):
    raise UserError(f"{dataset}: {path} should hold a list of question entries")
  out: dict[str, dict[str, list]] = {}
  for pos, e in enumerate(entries):
    try:
      video = video_of(e["video_id"] if "video_id" in e else e["video"])
      qa = out.setdefault(video, {"questions": [], "answers": [], "question_ids": []})
      qa["questions"].append(str(e["question"]).strip())
      qa["answers"].append(str(e["answer"]).strip())
      qa["question_ids"].append(int(e.get("id", pos)))
    except (KeyError, TypeError, ValueError) as err:
      raise UserError(f"{dataset}: entry {pos} of {path} is not a QA entry "
                      f"(question, answer, video_id): {err!r}") from err
  return out


def qa_arrays(qa: dict[str, list]) -> dict[str, np.ndarray]:
  return {"questions": np.array(qa["questions"], dtype=object),
          "answers": np.array(qa["answers"], dtype=object),
          "question_ids": np.array(qa["question_ids"], dtype=np.int64)}
