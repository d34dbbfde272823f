r"""Object coverage of the masking strategies on the shapes test split (prints a table).

  python -m clusterstm_jax.tools.coverage --config=configs/pretrain.py [--ratio=0.85]
      [--num_batches=-1] [--batch_size=100] [--config.teacher.workdir=DIR]

For every strategy (clusterstm, clusterstm_random_pick, tube, random) the masks of the whole
split (or of its first --num_batches batches) are computed from the teacher's tokens at the
same masking ratio, and `masking.stats.mask_stats` is applied once to all of them together, so
the figures are pooled over the split (ratios of sums, not means of per-batch ratios):
  object_coverage      (object, frame) pairs with >= 1 kept token on the object;
  kept_on_objects      kept tokens lying on an object (object_area is its chance level);
  temporal_recurrence  kept positions of frame t also kept at t + 1.
On data with transient content (label 255: the distractors or stains of shapes' `distractors` /
`transients` configs), a last line gives each strategy's share of kept tokens on it against its
share of all tokens.

Also owns what masks.py reuses: `mask_fn` (teacher tokens -> masks of several
strategies, one jitted call) and `eval_batches` (the test split in fixed-size batches).
"""
from __future__ import annotations

from typing import Iterator, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from clusterstm_jax import cli
from clusterstm_jax import loop
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import stats
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tasks import base as tasks_base

STRATEGIES = ('clusterstm', 'clusterstm_random_pick', 'tube', 'random')
DISTRACTOR = 255  # the label of transient content (shapes' distractor and transient configs)
COLUMNS = ('object_coverage', 'kept_on_objects', 'temporal_recurrence', 'object_area')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so importing this module (tests, masks) is free."""
  cli.define_config('configs/pretrain.py', 'Config (teacher, data, mask).')
  flags.DEFINE_float('ratio', 0.85, 'Masking ratio for every strategy (overrides mask.ratio).')
  flags.DEFINE_integer('num_batches', -1, 'Batches of the split to use; -1 = the whole split.')
  flags.DEFINE_integer('batch_size', 100, 'Clips per batch.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random strategies.')


def with_ratio(config, ratio: float | None):
  """A copy of `config` whose mask.ratio is `ratio` (None keeps the config's)."""
  config = config.copy_and_resolve_references()
  if ratio is not None:
    masking.num_keep(1, ratio)  # ValueError naming the ratio when it is not in [0, 1)
    with config.unlocked():
      config.mask.ratio = float(ratio)
  return config


def mask_fn(config, teacher, strategies: Sequence[str] = STRATEGIES):
  """jitted (teacher params, video uint8 [B,T,H,W,3], rng) -> {strategy: MaskOutput}.

  The teacher runs once per batch; every strategy masks the same tokens, each with its own key.
  """
  for s in strategies:
    if s not in masking.STRATEGIES:
      raise ValueError(f'unknown masking strategy {s!r}; expected one of {masking.STRATEGIES}')
  t, h, w = tasks_base.grid(config)
  configs = {}
  for s in strategies:
    configs[s] = ml_collections.ConfigDict(config.mask.to_dict())
    configs[s].strategy = s

  def fn(tparams, video, rng):
    features = teacher.frame_tokens(tparams, tasks_base.normalize_video(video))
    shape = (video.shape[0], t, h * w)
    return {s: masking.mask_from_config(configs[s], jax.random.fold_in(rng, i), shape, features)
            for i, s in enumerate(strategies)}

  return jax.jit(fn)


def eval_batches(config, tokenizer, batch_size: int, num_batches: int = -1) -> Iterator[dict]:
  """Numpy batches of the eval split in order; all of `batch_size` rows (one compiled shape),
  the last one padded with rows marked valid=False."""
  loader = pipeline.make_eval_loader(config.data, tokenizer, split=config.data.eval_split,
                                     global_batch_size=batch_size, process_index=0,
                                     process_count=1)
  for i, batch in enumerate(loader):
    if 0 <= num_batches <= i:
      return
    yield {k: np.asarray(v) for k, v in batch.items()}


def distractor_tokens(labels: np.ndarray, patch: int) -> np.ndarray:
  """bool [B,T,N]: tokens with a pixel of a transient distractor (label DISTRACTOR)."""
  b, t, h, w = labels.shape
  x = labels.reshape(b, t, h // patch, patch, w // patch, patch)
  return (x == DISTRACTOR).any(axis=(3, 5)).reshape(b, t, -1)


def collect(config, teacher, tokenizer, *, batch_size: int, num_batches: int = -1, seed: int = 0,
            strategies: Sequence[str] = STRATEGIES, with_distractors: bool = False):
  """(keep masks {strategy: bool [S,T,N]}, token objects bool [S,T,N,K]) over S split clips;
  with_distractors: also the distractor tokens bool [S,T,N] (distractor_tokens)."""
  fn = mask_fn(config, teacher, strategies)
  patch = tasks_base.patch_size(config)
  objects_fn = jax.jit(lambda labels: stats.token_objects(labels, patch))
  key = jax.random.key(seed)
  keeps, objects, distractors = {s: [] for s in strategies}, [], []
  for i, batch in enumerate(eval_batches(config, tokenizer, batch_size, num_batches)):
    masks = jax.device_get(fn(teacher.params, batch['video'], jax.random.fold_in(key, i)))
    valid = batch['valid'].astype(bool)  # padding rows are masked too, then dropped
    for s in strategies:
      keeps[s].append(np.asarray(masks[s].keep_mask)[valid])
    objects.append(np.asarray(objects_fn(batch['labels']))[valid])
    distractors.append(distractor_tokens(np.asarray(batch['labels']), patch)[valid])
  if not objects:
    raise ValueError(f'no clips in split {config.data.eval_split!r} (num_batches={num_batches})')
  out = {s: np.concatenate(v) for s, v in keeps.items()}, np.concatenate(objects)
  return (*out, np.concatenate(distractors)) if with_distractors else out


def distractor_shares(keeps: dict[str, np.ndarray], distractors: np.ndarray) -> dict[str, float]:
  """{'area': share of all tokens on a distractor, strategy: share of its kept tokens on one}."""
  shares = {'area': float(distractors.mean())}
  for s, keep in keeps.items():
    shares[s] = float((keep & distractors).sum() / max(keep.sum(), 1))
  return shares


def coverage_table(config, teacher, tokenizer, *, ratio: float | None = 0.85,
                   batch_size: int = 100, num_batches: int = -1, seed: int = 0,
                   strategies: Sequence[str] = STRATEGIES) -> dict[str, dict[str, float]]:
  """{strategy: {stat: value}} pooled over the split at masking ratio `ratio`, and where the
  data has transient distractors, {'distractors': distractor_shares}."""
  keeps, objects, distractors = collect(
      with_ratio(config, ratio), teacher, tokenizer, batch_size=batch_size,
      num_batches=num_batches, seed=seed, strategies=strategies, with_distractors=True)
  table = stats_table(keeps, objects)
  if distractors.any():
    table['distractors'] = distractor_shares(keeps, distractors)
  return table


def stats_table(keeps: dict[str, np.ndarray], objects: np.ndarray) -> dict[str, dict[str, float]]:
  """mask_stats of every strategy's keep masks [S,T,N] against token objects [S,T,N,K], all S
  clips at once (pooled), plus num_clips."""
  table = {}
  for s, keep in keeps.items():
    table[s] = {k: float(v) for k, v in stats.mask_stats(keep, objects).items()}
    table[s]['num_clips'] = len(objects)
  return table


def format_table(table: dict[str, dict[str, float]]) -> str:
  lines = [f'{"strategy":24s}' + ''.join(f'{c:>21s}' for c in COLUMNS)]
  for s, row in table.items():
    lines.append(f'{s:24s}' + ''.join(f'{row[c]:21.4f}' for c in COLUMNS))
  return '\n'.join(lines)


def load(config):
  """(mesh, tokenizer, teacher) for a config; trains the teacher first when it has none."""
  mesh = sharding_lib.make_mesh(config.mesh)
  tokenizer = pipeline.get_tokenizer(config.data)
  loop.prepare_teacher(config, always=True)  # features for every strategy
  return mesh, tokenizer, teacher_lib.load_teacher(config, mesh)


def main() -> None:
  try:
    config = with_ratio(FLAGS.config, FLAGS.ratio)  # a bad ratio fails before any loading
    _, tokenizer, teacher = load(config)
    table = coverage_table(config, teacher, tokenizer, ratio=FLAGS.ratio,
                           batch_size=FLAGS.batch_size, num_batches=FLAGS.num_batches,
                           seed=FLAGS.seed)
  except ValueError as e:  # a bad ratio, an empty split: bad input, not a bug to trace
    raise UserError(str(e)) from e
  shares = table.pop('distractors', None)
  t, h, w = tasks_base.grid(config)
  n = h * w
  first = next(iter(table.values()))
  print(f'Masking on {config.data.name}/{config.data.builder_config} split '
        f'{config.data.eval_split!r}: {first["num_clips"]} clips, T={t}, N={n}, '
        f'ratio={FLAGS.ratio} -> N_c={masking.num_keep(n, FLAGS.ratio)} kept per frame')
  print(format_table(table))
  if shares is not None:  # kept tokens on distractors against their share of all tokens
    print(f'kept tokens on transient distractors (they are {100 * shares.pop("area"):.1f}% of '
          'all tokens): ' + ', '.join(f'{s} {100 * v:.1f}%' for s, v in shares.items()))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
