"""Your own videos (registered as 'folder'): a directory of video files (any codec PyAV reads)
and one annotation file, built like the real datasets (same records, same skip counting).

Layout, under <data_dir>/manual/folder/ (a symlink to your directory works):
  annotations.csv  or  annotations.jsonl
  the videos, at the paths the annotations give (relative to this directory, or absolute)
Fields (CSV columns / JSON keys): path, caption, and optionally split (default 'train'),
question, answer. Rows with the same split and path are one clip: its captions in file order
(the first is `caption`), and its (question, answer) pairs. A clip's file that is missing or
cannot be decoded is skipped and counted (skipped.json, and the build's log line).

Without config.data.tokenizer, a SentencePiece model is trained on the train split's captions
(and QA texts) into the build directory, as for shapes.
"""
from __future__ import annotations

import csv
import json
import os

from clusterstm_jax.data import tokenizer as tokenizer_lib
from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "folder"
FILES = ("annotations.csv", "annotations.jsonl")
TOKENIZER = "tokenizer.model"
VOCAB_SIZE = 4000  # an upper bound: a small corpus supports fewer pieces


class Folder(common.RealBuilder):
  """A directory of videos with captions (and optionally splits and QA pairs)."""

  name = "folder"
  HUMAN_NAME = NAME
  BUILDER_CONFIGS = [common.RealConfig(name="default", task="folder",
                                       description="annotations.csv / annotations.jsonl")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/folder/ (or symlink it to your directory):
    annotations.csv or annotations.jsonl   (path, caption[, split][, question, answer])
    the video files the paths name
  """

  def _split_items(self, root: str) -> dict:
    return {split: [common.Item(f"{split}/{path}", _resolve(root, path),
                                {**common.text_features(clip["captions"]),
                                 **common.qa_arrays(clip)})
                    for path, clip in clips.items()]
            for split, clips in read_annotations(root).items()}

  def _extra_features(self) -> dict:
    return common.qa_features()

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                 **kwargs)
    path = tokenizer_path(self)
    if not os.path.isfile(path):  # trained once per build, from its own train captions
      source = self.as_data_source("train") if "train" in self.info.splits else []
      texts = []
      for i in range(len(source)):
        ex = source[i]
        texts += [_text(c) for c in ex["captions"]]
        texts += [_text(q) for q in ex["questions"]] + [_text(a) for a in ex["answers"]]
      if not texts:
        raise UserError(f"{NAME}: no train captions to train a tokenizer on; give "
                        "config.data.tokenizer")
      tokenizer_lib.train_sentencepiece(texts, path, vocab_size=VOCAB_SIZE)


def tokenizer_path(builder) -> str:
  return os.path.join(os.fspath(builder.data_dir), TOKENIZER)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _resolve(root: str, path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(root, path)


def _rows(root: str):
  path = common.require_file(NAME, root, FILES, "an annotation file (annotations.csv or "
                                                ".jsonl)")
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if "path" not in (reader.fieldnames or []):
        raise UserError(f"{NAME}: {path} has no 'path' column; it has {reader.fieldnames}")
      for line, row in enumerate(reader, 2):
        yield path, line, row
    return
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      if text.strip():
        try:
          row = json.loads(text)
        except ValueError as e:
          raise UserError(f"{NAME}: {path}:{line} is not JSON: {e}") from None
        if not isinstance(row, dict):
          raise UserError(f"{NAME}: {path}:{line} is not a JSON object")
        yield path, line, row


def read_annotations(root: str) -> dict[str, dict[str, dict[str, list]]]:
  """split -> clip path -> {captions, questions, answers, question_ids}, in file order."""
  out: dict[str, dict[str, dict[str, list]]] = {}
  qid = 0
  for path, line, row in _rows(root):
    clip_path = str(row.get("path") or "").strip()
    if not clip_path:
      raise UserError(f"{NAME}: {path}:{line} has no path")
    split = str(row.get("split") or "train").strip()
    clip = out.setdefault(split, {}).setdefault(
        clip_path, {"captions": [], "questions": [], "answers": [], "question_ids": []})
    caption = str(row.get("caption") or "").strip()
    if caption:
      clip["captions"].append(caption)
    question, answer = (str(row.get(k) or "").strip() for k in ("question", "answer"))
    if bool(question) != bool(answer):
      raise UserError(f"{NAME}: {path}:{line} has a question without an answer or the reverse")
    if question:
      clip["questions"].append(question)
      clip["answers"].append(answer)
      clip["question_ids"].append(qid)
      qid += 1
  if not out:
    raise UserError(f"{NAME}: the annotation file under {root} has no rows")
  return out
