"""ActivityNet Captions builder (registered as 'activitynet'): ~20k YouTube videos with dense
event descriptions, stored for paragraph retrieval.

One record per video: caption = the paragraph (its sentences in start-time order, joined by
spaces), captions = the sentences, segments = their [start, end] in seconds. Splits follow the
annotation files: train, val_1 (the usual paragraph-retrieval test set) and, when its file is
there, val_2.
"""
from __future__ import annotations

import os

import numpy as np

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "ActivityNet Captions"


class Activitynet(common.RealBuilder):
  """ActivityNet Captions (Krishna et al., ICCV 2017) from hand-downloaded videos and captions."""

  name = "activitynet"
  HUMAN_NAME = NAME
  HOMEPAGE = "https://cs.stanford.edu/people/ranjaykrishna/densevid/"
  BUILDER_CONFIGS = [common.RealConfig(name="default", task="paragraph",
                                       description="Paragraph retrieval: train, val_1, val_2.")]
  SPLITS = {"*": ("train", "val_1", "val_2")}
  OPTIONAL_SPLITS = ("val_2",)
  EVAL_SPLIT = "val_1"  # the paragraph-retrieval test set of the literature
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/activitynet/:
    train.json, val_1.json, val_2.json (optional)   (captions.zip; a captions/ folder also works)
    videos/v_<youtube id>.mp4   (any extension and sub-folder; names without 'v_' work too)
  """

  def _split_items(self, root: str) -> dict:
    video_dir = common.require_dir(NAME, root, "videos", "the video folder")
    videos = common.index_files(video_dir)
    out = {}
    for split in ("train", "val_1", "val_2"):
      candidates = (f"{split}.json", f"captions/{split}.json")
      if split == "val_2" and common.find_file(root, candidates) is None:
        continue
      path = common.require_file(NAME, root, candidates, f"the {split} captions")
      out[split] = [common.Item(key, _find(videos, video_dir, key), features)
                    for key, features in _paragraphs(path)]
    return out

  def _extra_features(self) -> dict:
    return common.segment_features()


def _find(videos: dict[str, str], video_dir: str, key: str) -> str:
  # Downloads name files v_<id> (the annotation key) or just <id>.
  keys = [key, key[2:]] if key.startswith("v_") else [key]
  return common.locate(videos, keys, os.path.join(video_dir, f"{key}.mp4"))


def _paragraphs(path: str) -> list[tuple[str, dict]]:
  data = common.load_json(NAME, path)
  if not isinstance(data, dict):
    raise UserError(f"{NAME}: {path} should map video ids to {{duration, timestamps, sentences}}")
  out = []
  for key, ann in data.items():  # file order
    try:
      events = sorted(zip((tuple(map(float, t)) for t in ann["timestamps"]), ann["sentences"]),
                      key=lambda e: e[0][0])
    except (KeyError, TypeError, ValueError) as err:
      raise UserError(f"{NAME}: entry {key!r} of {path} lacks timestamps/sentences: {err!r}") from err
    sentences = [s.strip() for _, s in events]
    out.append((key, {**common.text_features(sentences, caption=" ".join(sentences)),
                      "segments": np.array([t for t, _ in events], np.float32).reshape(-1, 2)}))
  return out

