"""DiDeMo builder (registered as 'didemo'): ~10k Flickr videos with moment descriptions, stored
for paragraph retrieval.

One record per video: caption = the paragraph (all its descriptions in temporal order, joined by
spaces), captions = those descriptions, segments = their moments in seconds. A description's
moment is the most common [start, end] of its annotators (DiDeMo's `times`, in 5-second
segments: [s, e] covers seconds 5*s to 5*(e+1)); descriptions are ordered by that moment, ties
in file order.
"""
from __future__ import annotations

import collections
import os

import numpy as np

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "DiDeMo"
SPLITS = ("train", "val", "test")
SEGMENT_S = 5.0


class Didemo(common.RealBuilder):
  """DiDeMo (Hendricks et al., ICCV 2017) from the hand-downloaded videos and annotations."""

  name = "didemo"
  HUMAN_NAME = NAME
  HOMEPAGE = "https://github.com/LisaAnne/LocalizingMoments"
  BUILDER_CONFIGS = [common.RealConfig(name="default", task="paragraph",
                                       description="Paragraph retrieval, train/val/test.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/didemo/:
    train_data.json, val_data.json, test_data.json   (LocalizingMoments/data; data/ also works)
    videos/<video>   (the files of download_videos.py; the json's "video" name, any extension)
  """

  def _split_items(self, root: str) -> dict:
    video_dir = common.require_dir(NAME, root, "videos", "the video folder")
    videos = common.index_files(video_dir)
    out = {}
    for split in SPLITS:
      path = common.require_file(NAME, root, (f"{split}_data.json", f"data/{split}_data.json"),
                                 f"the {split} annotations")
      out[split] = [common.Item(video, _find(videos, video_dir, video), features)
                    for video, features in _paragraphs(path)]
    return out

  def _extra_features(self) -> dict:
    return common.segment_features()


def _find(videos: dict[str, str], video_dir: str, name: str) -> str:
  # Downloads keep the json's name, or swap its extension (.mov -> .mp4 after conversion).
  return common.locate(videos, [os.path.splitext(name)[0], name], os.path.join(video_dir, name))


def _paragraphs(path: str) -> list[tuple[str, dict]]:
  entries = common.load_json(NAME, path)
  by_video: dict[str, list[tuple[tuple[float, float], str]]] = collections.defaultdict(list)
  try:
    for e in entries:
      by_video[e["video"]].append((_moment(e["times"]), e["description"]))
  except (KeyError, TypeError, ValueError) as err:
    raise UserError(f"{NAME}: {path} is not a list of {{video, description, times}}: {err!r}") from err
  out = []
  for video, moments in by_video.items():  # videos in order of first appearance
    moments = sorted(moments, key=lambda m: m[0])  # stable: ties keep file order
    sentences = [d.strip() for _, d in moments]
    out.append((video, {**common.text_features(sentences, caption=" ".join(sentences)),
                        "segments": np.array([m for m, _ in moments], np.float32).reshape(-1, 2)}))
  return out


def _moment(times) -> tuple[float, float]:
  """Most common annotator [start, end] (first on ties), in seconds."""
  pairs = [tuple(int(x) for x in t) for t in times]
  if not pairs:
    raise ValueError("empty times")
  counts = collections.Counter(pairs)
  start, end = max(pairs, key=lambda p: (counts[p], -pairs.index(p)))
  return start * SEGMENT_S, (end + 1) * SEGMENT_S
