"""Registry of the real-dataset builders: name -> builder class, and `get_builder`.

Importing this module registers every real builder with TFDS (each also registers on its own
when its module `clusterstm_jax.data.builders.<name>` is imported, which is what pipeline.py does).

Build one beforehand (once; a multi-host job with a shared bucket data_dir should not race to
build it):
  python -m clusterstm_jax.data.builders.real --dataset=msrvtt --config=1ka --data_dir=DATA_DIR
"""
from __future__ import annotations

import dataclasses
import os
import re

from clusterstm_jax.data.builders import activitynet, cc3m, common, didemo, folder, msrvtt, msvd, webvid
from clusterstm_jax.errors import UserError

REAL_DATASETS: dict[str, type[common.RealBuilder]] = {
    "msrvtt": msrvtt.Msrvtt,
    "msvd": msvd.Msvd,
    "didemo": didemo.Didemo,
    "activitynet": activitynet.Activitynet,
    "webvid": webvid.Webvid,
    "cc3m": cc3m.Cc3m,
    "folder": folder.Folder,
}

# Config fields that change the stored records (a custom value gets its own config name).
_CONTENT_FIELDS = {"num_frames": "f", "image_size": "s", "jpeg_quality": "q"}


def get_builder(name: str, data_dir: str | os.PathLike, config: str | None = None, *,
                workers: int | None = None, chunk: int = 64, **overrides) -> common.RealBuilder:
  """The builder of dataset `name` in `data_dir` (not built: call `.download_and_prepare()`).

  config: a name from the builder's BUILDER_CONFIGS; None or 'default' (the data config's
  default) mean its first, e.g. msrvtt '1ka'. overrides: any of num_frames, image_size,
  jpeg_quality; they make a custom config named e.g. '1ka_f16_s160' (builds with other values
  live in other directories), and such a name given as `config` means the same overrides, so
  `config.data.builder_config` can name a custom build. workers: decode processes (None:
  CPUs-1; 0: in this process); chunk: files handed to the pool at a time.
  The files are read from `<data_dir>/manual/<name>/` unless download_and_prepare is given a
  DownloadConfig with another manual_dir.
  """
  if name not in REAL_DATASETS:
    raise UserError(f"unknown real dataset {name!r}; expected one of {sorted(REAL_DATASETS)}")
  cls = REAL_DATASETS[name]
  configs = {c.name: c for c in cls.BUILDER_CONFIGS}
  base_name = config or "default"
  custom = re.fullmatch(r"(.+?)((?:_[fsq]\d+)+)", base_name)
  if base_name not in configs and custom:  # e.g. '1ka_f16_s160'
    fields = {letter: field for field, letter in _CONTENT_FIELDS.items()}
    parsed = {fields[k]: int(v) for k, v in re.findall(r"_([fsq])(\d+)", custom.group(2))}
    base_name, overrides = custom.group(1), {**parsed, **overrides}
  if base_name == "default" and "default" not in configs:
    base_name = cls.BUILDER_CONFIGS[0].name
  if base_name not in configs:
    raise UserError(f"dataset {name!r} has no config {base_name!r}; expected one of {sorted(configs)}")
  unknown = sorted(set(overrides) - set(_CONTENT_FIELDS))
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for {name!r}; expected some of {sorted(_CONTENT_FIELDS)}")
  base = configs[base_name]
  changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
  for k, v in changed.items():
    if not isinstance(v, int) or v < 1 or (k == "jpeg_quality" and v > 100):
      raise UserError(f"{k} must be a positive integer (jpeg_quality at most 100), got {v!r}")
  if cls.IS_IMAGE and changed.get("num_frames", 1) != 1:
    raise UserError(f"{name!r} holds images: num_frames must be 1, got {changed['num_frames']}")
  cfg = base
  if changed:
    suffix = "_".join(f"{_CONTENT_FIELDS[k]}{changed[k]}" for k in _CONTENT_FIELDS if k in changed)
    cfg = dataclasses.replace(base, name=f"{base.name}_{suffix}", **changed)
  return cls(data_dir=os.path.expanduser(os.fspath(data_dir)), config=cfg, workers=workers, chunk=chunk)


def main(argv):
  """Builds one real dataset and prints its skip report (docs/datasets.md)."""
  from absl import flags

  del argv
  f = flags.FLAGS
  overrides = {k: getattr(f, k) for k in _CONTENT_FIELDS if getattr(f, k) is not None}
  try:
    builder = get_builder(f.dataset, f.data_dir, f.config, workers=f.workers, **overrides)
    import tensorflow_datasets as tfds

    existed = builder.data_path.exists()
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if f.overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    manual = os.path.expanduser(f.manual_dir) if f.manual_dir else None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual, download_mode=mode))
  except (UserError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{builder.name}/{builder.builder_config.name}: {builder.data_dir}")
  if existed and not f.overwrite:
    print("  already built: nothing read; --overwrite rebuilds it from the manual dir")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")
  report = builder.skipped()
  if report:
    print("  " + common.summary(report))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_enum("dataset", None, sorted(REAL_DATASETS), "Which dataset to build.", required=True)
  flags.DEFINE_string("data_dir", os.environ.get("CLUSTERSTM_DATA_DIR", "~/.cache/clusterstm_jax/data"),
                      "TFDS data dir; the files are read from <data_dir>/manual/<dataset>/.")
  flags.DEFINE_string("config", None, "Builder config (default: the dataset's first).")
  flags.DEFINE_string("manual_dir", None, "Read the downloaded files from here instead.")
  flags.DEFINE_integer("num_frames", None, "Frames stored per video (a custom config).")
  flags.DEFINE_integer("image_size", None, "Short side of the stored frames (a custom config).")
  flags.DEFINE_integer("jpeg_quality", None, "JPEG quality of the stored frames (a custom config).")
  flags.DEFINE_bool("overwrite", False, "Rebuild even when built (after fixing the files).")
  flags.DEFINE_integer("workers", None, "Decode processes (default: CPUs - 1; 0: in-process).")
  app.run(main)
