"""CC3M builder (registered as 'cc3m'): Conceptual Captions image-text pairs, stored as 1-frame
examples.

The TSVs (caption TAB url, no header) list the pairs; the image of data row i (0-based) is a
file whose name is the integer i, zero-padded to any width, anywhere under the split's image
folder. That is what img2dataset writes with `--output_format files` from the TSV in its
original order (e.g. train/00012/000120345.jpg for row 120345, with 10,000 samples per shard);
a flat train/000120345.jpg works too. Rows whose image was not downloaded count as missing.
video_id is the row index as a string. Splits: train (required) and val (when its TSV is there).
"""
from __future__ import annotations

import csv
import os
from typing import Iterator

from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError

NAME = "CC3M"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_FILES = {"train": ("Train_GCC-training.tsv", "train"),
          "val": ("Validation_GCC-1.1.0-Validation.tsv", "val")}


class Cc3m(common.RealBuilder):
  """Conceptual Captions 3M (Sharma et al., ACL 2018) from the TSVs and downloaded images."""

  name = "cc3m"
  HUMAN_NAME = NAME
  HOMEPAGE = "https://ai.google.com/research/ConceptualCaptions/"
  IS_IMAGE = True
  SPLITS = {"*": ("train", "val")}
  OPTIONAL_SPLITS = ("val",)
  BUILDER_CONFIGS = [common.RealConfig(name="default", task="images", num_frames=1,
                                       description="Images as 1-frame examples.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put under <data_dir>/manual/cc3m/:
    Train_GCC-training.tsv, Validation_GCC-1.1.0-Validation.tsv (optional)
    train/<row>.jpg, val/<row>.jpg   (row = 0-based TSV row, any zero padding, any sub-folder:
                                      img2dataset --output_format files writes train/00012/000120345.jpg)
  """

  def _split_items(self, root: str) -> dict:
    out = {}
    for split, (tsv, folder) in _FILES.items():
      if split == "val" and common.find_file(root, (tsv,)) is None:
        continue
      path = common.require_file(NAME, root, (tsv,), f"the {split} TSV")
      folder = common.require_dir(NAME, root, folder, f"the {split} image folder")
      out[split] = _rows(path, _index_images(folder), folder)
    return out


def _index_images(directory: str) -> dict[int, str]:
  """Row index -> image path, for files whose stem is an integer."""
  out: dict[int, str] = {}
  for dirpath, _, filenames in common.walk(directory):  # sorted: deterministic on duplicates
    for name in sorted(filenames):
      stem, ext = os.path.splitext(name)
      if stem.isdigit() and ext.lower() in IMAGE_EXTENSIONS:
        out.setdefault(int(stem), os.path.join(dirpath, name))
  return out


def _rows(path: str, images: dict[int, str], folder: str) -> Iterator[common.Item]:
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    first = True
    row_index = 0
    for fields in reader:
      if first and fields[:2] == ["caption", "url"]:  # a header added for img2dataset
        first = False
        continue
      first = False
      if len(fields) < 2:
        raise UserError(f"{NAME}: row {row_index} of {path} is not 'caption<TAB>url': {fields!r}")
      path = images.get(row_index, os.path.join(folder, f"{row_index:09d}.jpg"))
      yield common.Item(str(row_index), path, common.text_features([fields[0]]))
      row_index += 1
