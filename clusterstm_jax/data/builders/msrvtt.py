"""MSR-VTT builder (registered as 'msrvtt'): 10k web clips with 20 captions each, and MSRVTT-QA.

Configs (the annotation protocol; see RealConfig for frames and size):
  1ka       retrieval "1k-A" (JSFusion): train = the 9,000 videos of MSRVTT_train.9k.csv with all
            their captions; test = the 1,000 (video, sentence) pairs of MSRVTT_JSFUSION_test.csv,
            caption = that sentence.
  official  captioning: train/val/test = 6,513/497/2,990 videos with all captions (the split
            field of the annotation json; video0-6512/6513-7009/7010-9999 when it has none or,
            like CLIP4Clip's MSRVTT_data.json, marks every video 'train').
  qa        MSRVTT-QA: the same official split, one record per video with its questions,
            answers and question ids (captions too when the annotation json is there).
"""
from __future__ import annotations

import collections
import csv
import os

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "MSR-VTT"
# Frozen-in-time's MSRVTT.zip / CLIP4Clip's msrvtt_data.zip / the original challenge files.
CAPTION_JSONS = ("annotation/MSR_VTT.json", "MSR_VTT.json", "msrvtt_data/MSRVTT_data.json",
                 "MSRVTT_data.json", "train_val_videodatainfo.json")
TRAIN_9K = ("msrvtt_data/MSRVTT_train.9k.csv", "MSRVTT_train.9k.csv",
            "high-quality/structured-symlinks/train_list_jsfusion.txt")
TEST_1K = ("msrvtt_data/MSRVTT_JSFUSION_test.csv", "MSRVTT_JSFUSION_test.csv")
SPLITS = ("train", "val", "test")
_OFFICIAL_RANGES = {"train": range(0, 6513), "val": range(6513, 7010), "test": range(7010, 10000)}


class Msrvtt(common.RealBuilder):
  """MSR-VTT (Xu et al., CVPR 2016) from the hand-downloaded videos and annotations."""

  name = "msrvtt"
  HUMAN_NAME = NAME
  MULTI_CAPTION = True  # training: every (video, caption) pair (data/examples.py)
  HOMEPAGE = "https://www.microsoft.com/en-us/research/publication/msr-vtt-a-large-video-description-dataset-for-bridging-video-and-language/"
  SPLITS = {"1ka": ("train", "test"), "*": SPLITS}
  BUILDER_CONFIGS = [
      common.RealConfig(name="1ka", task="1ka", description="1k-A retrieval: 9k train, 1k test."),
      common.RealConfig(name="official", task="official", description="6513/497/2990, all captions."),
      common.RealConfig(name="qa", task="qa", description="MSRVTT-QA on the official split."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/msrvtt/:
    videos/all/video0.mp4 ... video9999.mp4   (any folder under videos/ works)
    annotation/MSR_VTT.json                   (or msrvtt_data/MSRVTT_data.json, or
                                               train_val_videodatainfo.json + test_videodatainfo.json)
    msrvtt_data/MSRVTT_train.9k.csv, msrvtt_data/MSRVTT_JSFUSION_test.csv   (config 1ka)
    qa/train_qa.json, qa/val_qa.json, qa/test_qa.json                       (config qa)
  """

  def _split_items(self, root: str) -> dict:
    task = self.builder_config.task
    video_dir = common.require_dir(NAME, root, "videos", "the video folder")
    index = common.index_files(video_dir)
    videos = lambda v: common.locate(index, [v], os.path.join(video_dir, "all", f"{v}.mp4"))
    if task == "1ka":
      captions, _ = _load_caption_json(root, required=True)
      return {"train": _items(videos, _train_9k(root), captions),
              "test": _test_1k(root, videos)}
    if task == "official":
      captions, splits = _load_caption_json(root, required=True)
      return {s: _items(videos, _official_ids(splits, s), captions) for s in SPLITS}
    if task == "qa":
      captions, _ = _load_caption_json(root, required=False)
      out = {}
      for split in SPLITS:
        path = common.require_file(NAME, root, (f"qa/{split}_qa.json", f"{split}_qa.json"),
                                   f"the MSRVTT-QA {split} file")
        qa = common.group_qa(NAME, path, _qa_video_id)
        out[split] = [common.Item(v, videos(v), {**common.text_features(captions.get(v, [])),
                                                     **common.qa_arrays(qa[v])})
                      for v in sorted(qa, key=common.natural_key)]
      return out
    raise ValueError(f"unknown msrvtt task {task!r}")

  def _extra_features(self) -> dict:
    return common.qa_features() if self.builder_config.task == "qa" else {}


def _load_caption_json(root: str, required: bool) -> tuple[dict[str, list[str]], dict[str, str]]:
  """video id -> captions (file order), and video id -> split when the json has one."""
  if required:
    path = common.require_file(NAME, root, CAPTION_JSONS, "the caption annotation json")
  else:
    path = common.find_file(root, CAPTION_JSONS)
    if path is None:
      return {}, {}
  paths = [path]
  if path.endswith("train_val_videodatainfo.json"):  # the challenge release: test in its own file
    paths += [p for p in [common.find_file(root, ("test_videodatainfo.json",))] if p]
  captions, splits = collections.defaultdict(list), {}
  for p in paths:
    data = common.load_json(NAME, p)
    # MSRVTT_data.json / *_videodatainfo.json: 'sentences' + 'videos'; MSR_VTT.json: COCO-style.
    for s in data.get("sentences") or data.get("annotations") or []:
      captions[s.get("video_id", s.get("image_id"))].append(s["caption"])
    for v in data.get("videos") or []:
      if "split" in v:
        splits[v["video_id"]] = {"validate": "val"}.get(v["split"], v["split"])
  if not captions:
    raise UserError(f"{NAME}: no captions ('sentences' or 'annotations') in {path}")
  return dict(captions), splits


def _official_ids(splits: dict, split: str) -> list[str]:
  # CLIP4Clip's MSRVTT_data.json marks every video 'train': only a real split field is used.
  if len(set(splits.values())) > 1:
    return sorted((v for v, s in splits.items() if s == split), key=common.natural_key)
  return [f"video{i}" for i in _OFFICIAL_RANGES[split]]


def _items(videos, ids: list[str], captions: dict) -> list[common.Item]:
  return [common.Item(v, videos(v), common.text_features(captions.get(v, []))) for v in ids]


def _train_9k(root: str) -> list[str]:
  path = common.require_file(NAME, root, TRAIN_9K, "the 1k-A train list")
  with open(path, newline="", encoding="utf-8") as f:
    if path.endswith(".txt"):
      return [line.strip() for line in f if line.strip()]
    return [row["video_id"].strip() for row in _csv_rows(path, f, ("video_id",))]


def _test_1k(root: str, videos) -> list[common.Item]:
  path = common.require_file(NAME, root, TEST_1K, "the 1k-A (JSFusion) test csv")
  with open(path, newline="", encoding="utf-8") as f:
    return [common.Item(row["video_id"].strip(), videos(row["video_id"].strip()),
                        common.text_features([row["sentence"]]))
            for row in _csv_rows(path, f, ("video_id", "sentence"))]


def _csv_rows(path: str, f, columns: tuple[str, ...]):
  reader = csv.DictReader(f)
  missing = [c for c in columns if c not in (reader.fieldnames or [])]
  if missing:
    raise UserError(f"{NAME}: {path} lacks the column(s) {missing}; it has {reader.fieldnames}")
  return list(reader)


def _qa_video_id(video) -> str:
  # MSRVTT-QA stores the integer N of 'videoN'; accept 'videoN' and 'N' strings too.
  text = str(video).strip()
  text = os.path.splitext(text)[0]
  return text if text.startswith("video") else f"video{int(text)}"
