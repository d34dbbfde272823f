r"""Writes shapes clips as mp4 files plus an annotations.csv: a `folder` dataset to try the
own-videos path offline (README, "Your own videos").

  python -m clusterstm_jax.tools.shapes_videos --out=DIR [--train=256] [--test=64]

DIR/videos/<split>_<i>.mp4 (8 frames, 64x64, H.264) and DIR/annotations.csv with the columns
path, caption, split, question, answer: one row per clip with its caption, then one row per
question-answer pair (the folder builder groups the rows of a clip).
"""
from __future__ import annotations

import csv
import os

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax.data import shapes
from clusterstm_jax.data import video_io

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Directory to write.', required=True)
flags.DEFINE_integer('train', 256, 'Train clips.')
flags.DEFINE_integer('test', 64, 'Test clips (unique captions).')
flags.DEFINE_integer('seed', 0, 'Seed of the shapes generator.')


def write(out: str, counts: dict[str, int], seed: int = 0) -> str:
  """Writes the clips and annotations; returns the annotations path."""
  os.makedirs(os.path.join(out, 'videos'), exist_ok=True)
  path = os.path.join(out, 'annotations.csv')
  with open(path + '.tmp', 'w', newline='', encoding='utf-8') as f:
    rows = csv.writer(f)
    rows.writerow(['path', 'caption', 'split', 'question', 'answer'])
    for split, n in counts.items():
      for ex in shapes.generate_split(split, n, seed):
        rel = f'videos/{split}_{ex["id"]}.mp4'
        video_io.write_mp4(os.path.join(out, rel), ex['frames'])
        rows.writerow([rel, ex['caption'], split, '', ''])
        for q, a in zip(ex['questions'], ex['answers']):
          rows.writerow([rel, '', split, q, a])
  os.replace(path + '.tmp', path)
  return path


def main() -> None:
  path = write(FLAGS.out, {'train': FLAGS.train, 'test': FLAGS.test}, FLAGS.seed)
  print(f'wrote {FLAGS.train + FLAGS.test} clips and {path}')


if __name__ == '__main__':
  cli.run(main)
