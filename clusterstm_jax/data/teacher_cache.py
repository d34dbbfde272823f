"""The offline teacher cache: its on-disk format, the views, and how the train loader reads it.

`python -m clusterstm_jax.tools.teacher_cache` runs the frozen teacher once over the training
examples and stores, for K views of each example, what the step would otherwise ask the teacher
for (tasks/pretrain.py `teacher_signals`): the kept-token indices of the cluster mask, the
per-token MRM target (before its per-clip standardisation) and the teacher's text feature of the
caption. A view is fixed frame indices and a patch-aligned square crop, drawn from
(seed, example, view) alone.

Layout of a cache directory:
  manifest.json                       the fingerprint of what the cache was made for, K, the
                                      record layout and the shard count (written first)
  shard-00003-of-00010.array_record   examples [3 S, 4 S) x K views, record (j - 3 S) K + v;
                                      written to a temp name, renamed when whole
Shard i belongs to process i % process_count. A shard exists under its final name only when
complete, so a killed pass resumes by writing the missing shards, and a reader never sees half
a shard. Training (config.teacher.cache) checks the fingerprint against its config.
"""
from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from clusterstm_jax.data import video_io
from clusterstm_jax.errors import UserError

MANIFEST = 'manifest.json'
FORMAT = 1
# The batch fields the cache adds (tasks/pretrain.py reads them instead of running the teacher).
FIELDS = ('keep_idx', 'mrm_target', 'text_emb')
_EXAMPLE = '_cache_example'  # the example index the source wrapper adds for the decode


def fingerprint(config, teacher_source: str, num_keep: int, patch: int) -> dict:
  """What a cache depends on; a training config must match it field by field."""
  d, m = config.data, config.mask
  teacher_tok = config.teacher.get('tokenizer') if 'teacher' in config else None
  return dict(format=FORMAT, dataset=d.name, builder_config=d.builder_config,
              split=d.train_split, captions=d.get('captions', 'pairs'),
              tokenizer=d.tokenizer, num_frames=d.num_frames, image_size=d.image_size,
              max_text_len=d.max_text_len, patch=patch, num_keep=num_keep,
              teacher=os.path.abspath(os.path.expanduser(teacher_source)),
              teacher_tokenizer=teacher_tok.to_dict() if teacher_tok is not None else {},
              mask=dict(strategy=m.strategy, ratio=m.ratio, dpc_k=m.dpc_k, d_c=m.d_c,
                        normalize=m.normalize),
              mrm_window=config.mrm.window, seed=config.seed)


def layout(num_frames: int, num_tokens: int, num_keep: int, text_dim: int) -> list:
  """[(name, dtype, shape)] of one record, in byte order."""
  return [['frames', 'int32', [num_frames]], ['crop', 'int32', [3]],
          ['keep_idx', 'int16', [num_frames, num_keep]],
          ['mrm_target', 'float32', [num_frames, num_tokens]], ['text_emb', 'float32', [text_dim]]]


def encode(record: dict, lay: list) -> bytes:
  return b''.join(np.ascontiguousarray(record[k], dtype=t).reshape(s).tobytes()
                  for k, t, s in lay)


def decode(data: bytes, lay: list) -> dict:
  out, off = {}, 0
  for k, t, s in lay:
    n = int(np.prod(s)) * np.dtype(t).itemsize
    out[k] = np.frombuffer(data, t, count=int(np.prod(s)), offset=off).reshape(s)
    off += n
  return out


def make_view(seed: int, example: int, view: int, num_source_frames: int, height: int,
              width: int, num_frames: int, image_size: int, patch: int) -> dict:
  """View `view` of example `example`: frame indices [T] (TSN segments, as the live loader) and
  a square crop (top, left, side) whose offset is a whole number of student patches (source
  pixels per patch), all drawn from (seed, example, view) alone."""
  rng = np.random.default_rng([seed, example, view])
  frames = video_io.sample_frame_indices(num_source_frames, num_frames, rng)
  side = min(height, width)
  cell = max(1, round(side * patch / image_size))
  offset = int(rng.integers(0, (max(height, width) - side) // cell + 1)) * cell
  top, left = (offset, 0) if height > width else (0, offset)
  return dict(frames=frames.astype(np.int32), crop=np.array([top, left, side], np.int32))


def shard_name(i: int, n: int) -> str:
  return f'shard-{i:05d}-of-{n:05d}.array_record'


def write_json_atomic(path: str, obj) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_manifest(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write_shard(path: str, records: list[bytes]) -> None:
  """All records of one shard under a temp name, then renamed: never half a shard."""
  tmp = f'{path}.tmp.{os.getpid()}'
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, path)


def missing_shards(cache_dir: str, num_shards: int) -> list[int]:
  return [i for i in range(num_shards)
          if not os.path.exists(os.path.join(cache_dir, shard_name(i, num_shards)))]


def first_diff(want, have, prefix=''):
  """The first differing field of two fingerprints, as 'field: cache X, config Y'."""
  for k in sorted(set(want) | set(have)):
    a, b = have.get(k), want.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      sub = first_diff(b, a, f'{prefix}{k}.')
      if sub:
        return sub
    elif a != b:
      return f'{prefix}{k}: cache {a!r}, config {b!r}'
  return None


def open_manifest(cache_dir: str, want: dict | None = None) -> dict:
  """The manifest of a complete cache made for fingerprint `want`; else one UserError line."""
  path = os.path.join(os.path.expanduser(cache_dir), MANIFEST)
  redo = 'run python -m clusterstm_jax.tools.teacher_cache with this config'
  if not os.path.isfile(path):
    raise UserError(f'teacher cache {cache_dir} has no {MANIFEST} (config.teacher.cache; {redo})')
  try:
    manifest = read_manifest(path)
    have = manifest['fingerprint']
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'teacher cache {path} is unreadable: {e!r}') from e
  if want is not None:
    diff = first_diff(want, have)
    if diff:
      raise UserError(f'teacher cache {cache_dir} was made for another config ({diff}); {redo}')
  missing = missing_shards(os.path.dirname(path), manifest['num_shards'])
  if missing:
    raise UserError(f'teacher cache {cache_dir} is incomplete: {len(missing)} of '
                    f'{manifest["num_shards"]} shards missing (first {missing[0]}); run the '
                    'same teacher_cache command again to finish it')
  return manifest


class Reader:
  """Random access to record (example, view); opens shard files on first use (picklable)."""

  def __init__(self, cache_dir: str, manifest: dict):
    self._dir, self._m = os.path.expanduser(cache_dir), manifest
    self._readers = {}

  def __getstate__(self):
    return dict(self.__dict__, _readers={})

  @property
  def views(self) -> int:
    return self._m['views']

  def get(self, example: int, view: int) -> dict:
    s, k = self._m['shard_size'], self._m['views']
    i = example // s
    if i not in self._readers:
      path = os.path.join(self._dir, shard_name(i, self._m['num_shards']))
      self._readers[i] = array_record_module.ArrayRecordReader(path)
    data = self._readers[i].read([(example - i * s) * k + view])[0]
    return decode(data, self._m['layout'])


class CachedExamples:
  """The training examples with their index attached (what the cache is keyed by)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:  # grain checks a resumed iterator's source by its repr
    return f'CachedExamples({self._source!r})'

  def __getitem__(self, j: int) -> dict:
    return dict(self._source[j], **{_EXAMPLE: int(j)})


class CachedDecode:
  """A train decode (decode_example's signature) that applies one cached view per visit.

  The view of a visit is drawn from grain's per-record rng, itself a function of the shuffle
  seed and the record's position in the sampled sequence (epoch and example), so a resumed run
  reads the same views. The batch gains FIELDS from that view's record."""

  def __init__(self, decode, reader: Reader):
    self._decode, self._reader = decode, reader

  def __call__(self, ex, *, rng, **kwargs):
    view = int(rng.integers(self._reader.views))
    rec = self._reader.get(ex[_EXAMPLE], view)
    out = self._decode(ex, rng=None, view=(rec['frames'], rec['crop']), **kwargs)
    out['keep_idx'] = rec['keep_idx'].astype(np.int32)
    out['mrm_target'] = np.array(rec['mrm_target'])
    out['text_emb'] = np.array(rec['text_emb'])
    return out


def for_training(cache_dir: str, want: dict, source, decode) -> tuple:
  """(source, decode) of a train loader that reads the cache made for `want` over `source`."""
  manifest = open_manifest(cache_dir, want)
  if manifest['num_examples'] != len(source):
    raise UserError(f'teacher cache {cache_dir} holds {manifest["num_examples"]} examples, the '
                    f'training split {len(source)}; run the teacher_cache command again')
  return CachedExamples(source), CachedDecode(decode, Reader(cache_dir, manifest))


def check_config(config) -> None:
  """What the cache can stand in for; one UserError line otherwise."""
  if config.mask.strategy != 'clusterstm':
    raise UserError(f'config.teacher.cache needs mask.strategy=clusterstm (a deterministic '
                    f'mask), not {config.mask.strategy!r}')
  if not config.loss_weights.get('mrm', 0.0) > 0 or config.mrm.in_batch:
    raise UserError('config.teacher.cache needs loss_weights.mrm > 0 and mrm.in_batch=False '
                    '(per-clip targets)')
  if config.images.get('every', 0):
    raise UserError('config.teacher.cache covers the video stream only: set '
                    '--config.images.every=0')
  if config.data.get('captions', 'pairs') != 'pairs':
    raise UserError("config.teacher.cache needs data.captions='pairs' (targets are per caption)")
