r"""Pictures of the masks: DPC clusters and kept tokens of random, tube and ClusterSTM masking.

  python -m clusterstm_jax.tools.masks --config=configs/pretrain.py --out=DIR
      [--num_clips=3] [--scale=4] [--config.teacher.workdir=DIR]

For each of the first --num_clips clips of the test split, writes DIR/masks_<i>.png and, all
clips stacked, DIR/masks.png: rows = strategies, columns = frames. Every frame is upscaled
--scale times (nearest) and overlaid with one semi-transparent colour per DPC cluster of the
teacher's tokens (the clustering ClusterSTM uses, drawn in every row so the rows compare); the
tokens a strategy keeps are outlined. ClusterSTM keeps one token in every cluster; random and
tube leave clusters (often whole objects) without any.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from clusterstm_jax import cli
from clusterstm_jax.errors import UserError
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tools import coverage

STRATEGIES = ('random', 'tube', 'clusterstm')
ALPHA = 0.45
OUTLINE = (255, 255, 255)
LABEL_WIDTH = 120
CAPTION_HEIGHT = 18
GAP = 6
# 20 well-separated colours (Tableau 20 order); more clusters than that reuse them.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], np.uint8)

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config('configs/pretrain.py', 'Config (teacher, data, mask).')
  flags.DEFINE_string('out', None, 'Output directory for the PNGs.')
  flags.DEFINE_integer('num_clips', 3, 'Clips of the test split to draw.')
  flags.DEFINE_integer('scale', 4, 'Upscaling of every frame (nearest).')
  flags.DEFINE_integer('seed', 0, 'Seed of the random strategies.')


def render_frame(frame: np.ndarray, clusters: np.ndarray, keep: np.ndarray, patch: int,
                 scale: int) -> np.ndarray:
  """One frame uint8 [H,W,3] with clusters int [N] (-1 = no colour) and keep bool [N] on its
  row-major (H/patch, W/patch) token grid -> uint8 [H*scale, W*scale, 3]."""
  h, w = frame.shape[:2]
  gh, gw = h // patch, w // patch
  if clusters.shape != (gh * gw,) or keep.shape != (gh * gw,):
    raise ValueError(f'clusters {clusters.shape} and keep {keep.shape} must be [{gh * gw}] '
                     f'for a {h}x{w} frame with patch {patch}')
  s = patch * scale  # token side in output pixels
  img = np.repeat(np.repeat(frame.astype(np.float32), scale, 0), scale, 1)
  cl = np.repeat(np.repeat(clusters.reshape(gh, gw), s, 0), s, 1)
  colour = PALETTE[np.maximum(cl, 0) % len(PALETTE)].astype(np.float32)
  img = np.where((cl >= 0)[..., None], (1 - ALPHA) * img + ALPHA * colour, img)
  img = np.round(img).astype(np.uint8)
  # Outline of every kept token: a 1-pixel black border around a 2-pixel white one (visible
  # on any background), drawn inside the token's square.
  for idx in np.flatnonzero(keep):
    y, x = (idx // gw) * s, (idx % gw) * s
    img[y:y + s, x:x + s][_ring(s, 0, 1)] = 0
    img[y:y + s, x:x + s][_ring(s, 1, 3)] = OUTLINE
  return img


def _ring(s: int, inner: int, outer: int) -> np.ndarray:
  """bool [s, s]: pixels whose distance to the square's border is in [inner, outer)."""
  i = np.arange(s)
  d = np.minimum(i, s - 1 - i)
  dist = np.minimum(d[:, None], d[None, :])
  return (dist >= inner) & (dist < outer)


def clip_image(video: np.ndarray, clusters: np.ndarray, keeps: dict[str, np.ndarray],
               patch: int, scale: int, caption: str = ''):
  """A PIL image of one clip: video uint8 [T,H,W,3], clusters [T,N], keeps {strategy: [T,N]}."""
  t, h, w = video.shape[:3]
  fh, fw = h * scale, w * scale
  rows = len(keeps)
  width = LABEL_WIDTH + t * (fw + GAP)
  height = CAPTION_HEIGHT + rows * (fh + GAP)
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 3), caption[:(width - 8) // 6], fill=(0, 0, 0))
  for r, (name, keep) in enumerate(keeps.items()):
    y = CAPTION_HEIGHT + r * (fh + GAP)
    draw.text((4, y + fh // 2 - 6), name, fill=(0, 0, 0))
    for f in range(t):
      tile = render_frame(video[f], clusters[f], keep[f], patch, scale)
      canvas.paste(Image.fromarray(tile), (LABEL_WIDTH + f * (fw + GAP), y))
  return canvas


def stack(images: Sequence) -> Image.Image:
  width = max(im.width for im in images)
  out = Image.new('RGB', (width, sum(im.height for im in images) + GAP * (len(images) - 1)),
                  (255, 255, 255))
  y = 0
  for im in images:
    out.paste(im, (0, y))
    y += im.height + GAP
  return out


def save_png(image, path: str) -> str:
  """Saves as an adaptive-palette PNG (the tiles are flat colours; ~5x smaller than RGB)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.quantize(colors=256, dither=0).save(path, optimize=True)
  return path


def visualize(config, teacher, tokenizer, out_dir: str, *, num_clips: int = 3, scale: int = 4,
              seed: int = 0, strategies: Sequence[str] = STRATEGIES) -> list[str]:
  """Writes masks_<i>.png per clip and masks.png (all clips); returns their paths, the
  combined one last."""
  if num_clips < 1 or scale < 1:
    raise ValueError(f'num_clips and scale must be >= 1, got {num_clips} and {scale}')
  # The DPC clusters drawn in every row are ClusterSTM's, so it is always computed.
  names = tuple(dict.fromkeys((*strategies, 'clusterstm')))
  batch = next(coverage.eval_batches(config, tokenizer, num_clips, num_batches=1))
  batch = {k: v[batch['valid']] for k, v in batch.items()}  # a split shorter than num_clips
  masks = jax.device_get(coverage.mask_fn(config, teacher, names)(
      teacher.params, batch['video'], jax.random.key(seed)))
  clusters = np.asarray(masks['clusterstm'].clusters)
  patch = tasks_base.patch_size(config)
  images, paths = [], []
  for i in range(len(batch['video'])):
    keeps = {s: np.asarray(masks[s].keep_mask[i]) for s in strategies}
    caption = tokenizer.decode(batch['text'][i])
    images.append(clip_image(batch['video'][i], clusters[i], keeps, patch, scale, caption))
    paths.append(save_png(images[-1], os.path.join(out_dir, f'masks_{i}.png')))
  paths.append(save_png(stack(images), os.path.join(out_dir, 'masks.png')))
  return paths


def main() -> None:
  if not FLAGS.out:
    raise UserError('--out=DIR is required')
  try:
    _, tokenizer, teacher = coverage.load(FLAGS.config)
    paths = visualize(FLAGS.config, teacher, tokenizer, FLAGS.out, num_clips=FLAGS.num_clips,
                      scale=FLAGS.scale, seed=FLAGS.seed)
  except ValueError as e:  # num_clips or scale < 1, an unknown strategy: bad input
    raise UserError(str(e)) from e
  for p in paths:
    print(f'wrote {p} ({os.path.getsize(p) / 1024:.0f} KB)')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
