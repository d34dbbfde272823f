r"""How much of the MRM target an oracle that knows the objects can explain (shapes data).

  python -m clusterstm_jax.tools.mrm_oracle --config=configs/pretrain.py [--num_batches=8]
      [--batch_size=64] [--seed=0] [--config.teacher.workdir=DIR]

The MRM loss is compared in the metrics with `mrm_baseline`, the best per-clip constant. This
says how far below it a loss could go on information the student could have: for train clips
(the config's data, teacher, mask and MRM settings, the live step's `teacher_signals`), over
each clip's masked places, the mean squared error of the standardised target around
  baseline            one constant per clip (what `mrm_baseline` logs);
  object_vs_background  the mean of the object tokens and the mean of the background tokens;
  per_object          the mean of each object's tokens (label maps: 0 background, k + 1 object k;
                      a token on several objects counts for the first) and of the background;
each pooled over all masked places (sums of squares over counts), and the variance explained
(1 - error / baseline). The student's own figure is its logged `mrm` against `mrm_baseline`.
"""
from __future__ import annotations

from absl import flags
import jax
import numpy as np

from clusterstm_jax import cli
from clusterstm_jax import losses
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import stats
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tasks import pretrain
from clusterstm_jax.tools import coverage

FLAGS = flags.FLAGS
PREDICTORS = ('baseline', 'object_vs_background', 'per_object')


def define_flags() -> None:
  cli.define_config('configs/pretrain.py', 'Config (data, teacher, mask, MRM).')
  flags.DEFINE_integer('num_batches', 8, 'Train batches to pool.')
  flags.DEFINE_integer('batch_size', 64, 'Clips per batch.')
  flags.DEFINE_integer('seed', 0, 'Data order and mask randomness.')


def group_sse(z, groups, masked, num_groups: int) -> float:
  """Sum over clips and groups of the squared deviations of z from its group's mean over the
  clip's masked places. z float [B,P], groups int [B,P] in [0, num_groups), masked bool [B,P]."""
  z = np.where(masked, np.asarray(z, np.float64), 0.0)
  onehot = (groups[..., None] == np.arange(num_groups)) & masked[..., None]  # [B,P,G]
  count = onehot.sum(1)
  total = np.einsum('bp,bpg->bg', z, onehot)
  explained = np.where(count > 0, total**2 / np.maximum(count, 1), 0.0)
  return float(np.sum(z**2) - np.sum(explained))


def errors(target, keep_mask, objects) -> dict[str, float]:
  """{predictor: summed squared error} and 'places' for one batch. target [B,T,N] raw MRM
  target; keep_mask bool [B,T,N]; objects bool [B,T,N,K] (stats.token_objects)."""
  b = target.shape[0]
  z = np.asarray(losses.standardize_per_clip(target)).reshape(b, -1)
  masked = ~np.asarray(keep_mask, bool).reshape(b, -1)
  objects = np.asarray(objects, bool).reshape(b, z.shape[1], -1)
  first = np.where(objects.any(-1), np.argmax(objects, -1) + 1, 0)
  return {'baseline': group_sse(z, np.zeros_like(first), masked, 1),
          'object_vs_background': group_sse(z, (first > 0).astype(int), masked, 2),
          'per_object': group_sse(z, first, masked, objects.shape[-1] + 1),
          'places': float(masked.sum())}


def oracle_table(config, teacher, tokenizer, *, num_batches: int, batch_size: int,
                 seed: int = 0) -> dict:
  """{predictor: {'mse', 'explained'}} pooled over `num_batches` train batches, plus
  'places' (masked places) and 'raw_std' (mean within-clip std of the raw target)."""
  if config.loss_weights.get('mrm', 0.0) <= 0 or config.mrm.in_batch:
    raise UserError('mrm_oracle needs MRM on (loss_weights.mrm > 0) with paired captions '
                    '(mrm.in_batch=False)')
  t, h, w = tasks_base.grid(config)
  patch = tasks_base.patch_size(config)
  signals = jax.jit(lambda p, v, ids, k: pretrain.teacher_signals(
      config, teacher, p, tasks_base.normalize_video(v), ids, k, (t, h, w)))
  objects_fn = jax.jit(lambda labels: stats.token_objects(labels, patch))
  loader = pipeline.make_train_loader(config.data, tokenizer, global_batch_size=batch_size,
                                      seed=seed, process_index=0, process_count=1,
                                      teacher_text=teacher.text_stream)
  sums, raw_std, key = dict.fromkeys((*PREDICTORS, 'places'), 0.0), [], jax.random.key(seed)
  for i, batch in zip(range(num_batches), loader):
    out = jax.device_get(signals(teacher.params, batch['video'], batch['teacher_text'],
                                 jax.random.fold_in(key, i)))
    keep = np.asarray(masking.from_keep_idx(out['keep_idx'], h * w).keep_mask)
    for k, v in errors(out['mrm_target'], keep, objects_fn(batch['labels'])).items():
      sums[k] += v
    raw_std.append(float(np.mean(np.std(out['mrm_target'], axis=(1, 2)))))
  if not raw_std:
    raise UserError('no training batches (the train split is empty or smaller than a batch)')
  table = {k: {'mse': sums[k] / sums['places'], 'explained': 1 - sums[k] / sums['baseline']}
           for k in PREDICTORS}
  return {**table, 'places': int(sums['places']), 'raw_std': float(np.mean(raw_std)),
          'num_clips': len(raw_std) * batch_size}


def main() -> None:
  config = FLAGS.config
  _, tokenizer, teacher = coverage.load(config)
  table = oracle_table(config, teacher, tokenizer, num_batches=FLAGS.num_batches,
                       batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  print(f'MRM target on {config.data.name}/{config.data.builder_config} train: '
        f'{table["num_clips"]} clips, {table["places"]} masked places; raw target std within a '
        f'clip {table["raw_std"]:.4f}')
  print(f'{"predictor":24s}{"mse":>10s}{"explained":>12s}')
  for k in PREDICTORS:
    print(f'{k:24s}{table[k]["mse"]:10.4f}{100 * table[k]["explained"]:11.1f}%')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
