"""MSVD builder (registered as 'msvd'): 1,970 YouTube clips with ~40 English captions each, and
MSVD-QA.

Configs:
  official  train/val/test = 1,200/100/670 clips with all their captions (caption = the first),
            for retrieval and captioning. The split is read from train_list.txt/val_list.txt/
            test_list.txt (clip names, as CLIP4Clip ships them) when present, otherwise from
            youtube_mapping.txt: vid1-vid1200 train, vid1201-vid1300 val, vid1301-vid1970 test.
  qa        MSVD-QA: one record per clip with its questions, answers and question ids; the QA
            files name clips by the N of 'vidN' in youtube_mapping.txt.
"""
from __future__ import annotations

import collections
import os

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "MSVD"
SPLITS = ("train", "val", "test")
_STANDARD_RANGES = {"train": range(1, 1201), "val": range(1201, 1301), "test": range(1301, 1971)}


class Msvd(common.RealBuilder):
  """MSVD / YouTube2Text (Chen & Dolan, ACL 2011) from the hand-downloaded clips and captions."""

  name = "msvd"
  HUMAN_NAME = NAME
  EVAL_ALL_CAPTIONS = True  # retrieval ranks every caption of a test clip (CLIP4Clip, UMT)
  MULTI_CAPTION = True  # training: every (video, caption) pair (data/examples.py)
  HOMEPAGE = "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/"
  BUILDER_CONFIGS = [
      common.RealConfig(name="official", task="official", description="1200/100/670, all captions."),
      common.RealConfig(name="qa", task="qa", description="MSVD-QA on the standard split."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/msvd/:
    YouTubeClips/<clip>.avi            (from YouTubeClips.tar, e.g. -4wsuPCjDBc_5_15.avi)
    AllVideoDescriptions.txt           (lines "<clip> <caption>", '#' comments)
    youtube_mapping.txt                (lines "<clip> vid<N>", shipped with MSVD-QA)
    train_list.txt, val_list.txt, test_list.txt   (optional: the split as clip names)
    qa/train_qa.json, qa/val_qa.json, qa/test_qa.json   (config qa)
  """

  def _split_items(self, root: str) -> dict:
    clip_dir = common.require_dir(NAME, root, "YouTubeClips", "the clip folder")
    index = common.index_files(clip_dir)
    videos = lambda c: common.locate(index, [c], os.path.join(clip_dir, f"{c}.avi"))
    task = self.builder_config.task
    if task == "official":
      captions = _read_descriptions(common.require_file(
          NAME, root, ("AllVideoDescriptions.txt",), "the caption file"))
      return {s: [common.Item(c, videos(c), common.text_features(captions.get(c, [])))
                  for c in ids] for s, ids in _split_clips(root).items()}
    if task == "qa":
      mapping = _read_mapping(common.require_file(
          NAME, root, ("youtube_mapping.txt", "qa/youtube_mapping.txt"), "the clip mapping"))
      path = common.find_file(root, ("AllVideoDescriptions.txt",))
      captions = _read_descriptions(path) if path else {}

      def clip_of(video) -> str:
        key = str(video).strip()
        key = key if key.startswith("vid") else f"vid{int(key)}"
        if key not in mapping:
          raise ValueError(f"{key} is not in youtube_mapping.txt")
        return mapping[key]

      order = {clip: i for i, clip in enumerate(mapping.values())}
      out = {}
      for split in SPLITS:
        qa = common.group_qa(NAME, common.require_file(
            NAME, root, (f"qa/{split}_qa.json", f"{split}_qa.json"), f"the MSVD-QA {split} file"),
            clip_of)
        out[split] = [common.Item(c, videos(c), {**common.text_features(captions.get(c, [])),
                                                     **common.qa_arrays(qa[c])})
                      for c in sorted(qa, key=order.__getitem__)]
      return out
    raise ValueError(f"unknown msvd task {task!r}")

  def _extra_features(self) -> dict:
    return common.qa_features() if self.builder_config.task == "qa" else {}


def _read_descriptions(path: str) -> dict[str, list[str]]:
  """AllVideoDescriptions.txt: clip -> captions in file order."""
  captions = collections.defaultdict(list)
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      clip, _, caption = line.partition(" ")
      if caption.strip():
        captions[clip].append(caption.strip())
  if not captions:
    raise UserError(f"{NAME}: no '<clip> <caption>' lines in {path}")
  return dict(captions)


def _read_mapping(path: str) -> dict[str, str]:
  """youtube_mapping.txt: 'vidN' -> clip name, in file order."""
  mapping = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].startswith("vid"):
        raise UserError(f"{NAME}: line {n} of {path} is not '<clip> vid<N>': {line.strip()!r}")
      mapping[parts[1]] = parts[0]
  return mapping


def _split_clips(root: str) -> dict[str, list[str]]:
  lists = {s: common.find_file(root, (f"{s}_list.txt", f"msvd_data/{s}_list.txt")) for s in SPLITS}
  if all(lists.values()):
    out = {}
    for s, path in lists.items():
      with open(path, encoding="utf-8") as f:
        out[s] = [os.path.splitext(line.strip())[0] for line in f if line.strip()]
    return out
  mapping = _read_mapping(common.require_file(
      NAME, root, ("youtube_mapping.txt", "qa/youtube_mapping.txt"),
      "the split (train_list.txt/val_list.txt/test_list.txt, or the clip mapping)"))
  return {s: [mapping[f"vid{i}"] for i in r if f"vid{i}" in mapping]
          for s, r in _STANDARD_RANGES.items()}
