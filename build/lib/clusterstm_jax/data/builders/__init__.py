"""TFDS dataset builders, and where the files of hand-downloaded datasets live.

`shapes.py` builds the synthetic default; `real.py` registers the real-dataset builders. Real
datasets are downloaded by hand into `manual_dir(data_dir, name)` in their original layout.

Note for builder authors: tfds 4.9.10 resolves `code_path` through `importlib_resources`, which it
does not install on Python >= 3.9; a builder without a checksums file sets `code_path = None`.
"""
import os


def manual_dir(data_dir: str, name: str) -> str:
  """Where the hand-downloaded files of dataset `name` are expected: <data_dir>/manual/<name>."""
  return os.path.join(os.path.expanduser(data_dir), "manual", name)
