"""What a data config names, checked in seconds before any build, teacher or training: the
dataset, its builder config, the splits a run will read and the tokenizer.

Each failure is one `UserError` line. Nothing here builds or reads a dataset: the split names
come from the builder's declaration (or from the build itself once it exists).
"""
from __future__ import annotations

import os
from typing import Iterable

from clusterstm_jax.data.tokenizer import open_tokenizer
from clusterstm_jax.errors import UserError

SHAPES_SPLITS = ('train', 'val', 'test')


def _real_builder(data_config):
  # lazy: TFDS builders load only when a real dataset is named
  from clusterstm_jax.data.builders import real

  name, config = data_config.name, data_config.builder_config or 'default'
  if name == 'shapes' or name not in real.REAL_DATASETS:
    raise UserError(f'unknown dataset {name!r}; expected one of '
                    f'{["shapes", *sorted(real.REAL_DATASETS)]}')
  if config == 'tiny':  # the smoke configs' shapes split, carried over by a --config.data.name
    raise UserError(f"builder config 'tiny' is a shapes split (:smoke sets it); dataset {name!r} "
                    f'has {[c.name for c in real.REAL_DATASETS[name].BUILDER_CONFIGS]}: set '
                    '--config.data.builder_config')
  return real.get_builder(name, data_config.data_dir, config, workers=0)


def split_names(data_config) -> tuple[str, ...]:
  """The splits of the named dataset and builder config, without building it."""
  if data_config.name == 'shapes':
    # lazy: TFDS builders load only when used
    from clusterstm_jax.data.builders import shapes as shapes_builder

    configs = [c.name for c in shapes_builder.Shapes.BUILDER_CONFIGS]
    if data_config.builder_config not in configs:
      raise UserError(f'dataset shapes has no builder config {data_config.builder_config!r}; '
                      f'expected one of {configs}')
    return SHAPES_SPLITS
  return _real_builder(data_config).split_names()


def eval_split(name: str) -> str:
  """The benchmark's test split of dataset `name` (ActivityNet Captions: val_1)."""
  if name == 'shapes':
    return 'test'
  # lazy: TFDS builders load only when a real dataset is named
  from clusterstm_jax.data.builders import real

  if name not in real.REAL_DATASETS:
    raise UserError(f'unknown dataset {name!r}; expected one of '
                    f'{["shapes", *sorted(real.REAL_DATASETS)]}')
  return real.REAL_DATASETS[name].EVAL_SPLIT


def check_tokenizer(data_config) -> None:
  """config.data.tokenizer names a SentencePiece model (or a BERT WordPiece vocab.txt) with our
  id conventions; real data needs
  one (the export's EXPORT/tokenizer.model when fine-tuning or evaluating an export)."""
  if data_config.tokenizer:
    open_tokenizer(os.path.expanduser(data_config.tokenizer))
  elif data_config.name not in ('shapes', 'folder'):  # both train their own at build time
    raise UserError(f'dataset {data_config.name!r} needs config.data.tokenizer: the '
                    'sentencepiece .model of the model you start from (EXPORT/tokenizer.model; '
                    '--config.init=EXPORT sets it), see docs/datasets.md')


def check_data(data_config, splits: Iterable[str] = (), *, tokenizer: bool = True) -> None:
  """Dataset, builder config, `splits` and (when `tokenizer`) the tokenizer of a data config."""
  have = split_names(data_config)
  for split in dict.fromkeys(s for s in splits if s):
    if split not in have:
      raise UserError(f'dataset {data_config.name!r} ({data_config.builder_config or "default"}) '
                      f'has no split {split!r}; it has {list(have)}')
  if tokenizer:
    check_tokenizer(data_config)
