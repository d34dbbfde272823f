"""WebVid builder (registered as 'webvid'): stock-footage clips with alt-text captions, for
pretraining.

Reads the release CSVs (columns videoid, contentUrl, duration, page_dir, name) row by row, so
millions of rows never sit in memory; the clip of a row is videos/<page_dir>/<videoid>.mp4, the
layout of the official download script. Rows whose clip was not downloaded are counted as
missing. Splits: train (required) and val (when its CSV is there).
"""
from __future__ import annotations

import csv
import os
from typing import Iterator

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "WebVid"
COLUMNS = ("videoid", "page_dir", "name")


class Webvid(common.RealBuilder):
  """WebVid-2M / WebVid-10M (Bain et al., ICCV 2021) from the CSVs and downloaded clips."""

  name = "webvid"
  HUMAN_NAME = NAME
  HOMEPAGE = "https://github.com/m-bain/webvid"
  BUILDER_CONFIGS = [
      common.RealConfig(name="default", task="2M", description="WebVid-2M: results_2M_*.csv."),
      common.RealConfig(name="10m", task="10M", description="WebVid-10M: results_10M_*.csv."),
  ]
  SPLITS = {"*": ("train", "val")}
  OPTIONAL_SPLITS = ("val",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/webvid/:
    results_2M_train.csv, results_2M_val.csv (optional)   (10M: results_10M_*.csv; a metadata/
                                                           folder also works)
    videos/<page_dir>/<videoid>.mp4                       (as the download script writes them)
  """

  def _split_items(self, root: str) -> dict:
    videos = common.require_dir(NAME, root, "videos", "the video folder")
    size = self.builder_config.task
    out = {}
    for split in ("train", "val"):
      candidates = (f"results_{size}_{split}.csv", f"metadata/results_{size}_{split}.csv")
      if split == "val" and common.find_file(root, candidates) is None:
        continue
      path = common.require_file(NAME, root, candidates, f"the {split} CSV")
      _check_header(path)
      out[split] = _rows(path, videos)
    return out


def _check_header(path: str):
  # Checked eagerly: the rows themselves are read lazily, during generation.
  with open(path, newline="", encoding="utf-8") as f:
    header = next(csv.reader(f), [])
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise UserError(f"{NAME}: {path} lacks the column(s) {missing}; it has {header}")


def _check_relative(path: str, line: int, column: str, value: str):
  """A CSV field that becomes part of a path stays inside the videos directory."""
  parts = value.replace("\\", "/").split("/")
  if not value or os.path.isabs(value) or ".." in parts or (column == "videoid" and len(parts) > 1):
    raise UserError(f"{NAME}: {path} line {line}: {column}={value!r} is not a plain relative "
                    "name (absolute, '..' or empty); fix the CSV")


def _rows(path: str, videos: str) -> Iterator[common.Item]:
  with open(path, newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      vid, page_dir = row["videoid"].strip(), row["page_dir"].strip()
      _check_relative(path, line, "page_dir", page_dir)
      _check_relative(path, line, "videoid", vid)
      yield common.Item(vid, os.path.join(videos, page_dir, f"{vid}.mp4"),
                        common.text_features([row["name"]]))
