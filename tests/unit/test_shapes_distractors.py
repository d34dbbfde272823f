"""The distractor variant of shapes: transient, never in the text, and the plain data unchanged."""
import dataclasses
import hashlib
import json

import numpy as np
import pytest

from clusterstm_jax.data import shapes, video_io
from clusterstm_jax.data.builders import shapes as shapes_builder

pytestmark = pytest.mark.unit

# sha256 of the first 12 clips of each split of the plain 'default' config (ids, texts, the JPEG
# and PNG bytes the builder stores), computed with the code from before distractors existed.
# (The array_record files are not the thing to hash: two builds by the same code differ in their
# raw bytes, TFDS's example serialisation is not byte-reproducible; the stored values are.)
PLAIN_DIGEST = 'b058e42ac066f6110e8b0e63b69d50ed15ae9eba5bafd89a8a25c4d2d2b77412'


def _config(name):
  return next(c for c in shapes_builder.Shapes.BUILDER_CONFIGS if c.name == name)


def _digest(cfg, per_split=12):
  h = hashlib.sha256()
  for split in ('train', 'val', 'test'):
    for _, (i, pair, scene) in zip(range(per_split), shapes_builder.split_items(cfg, split)):
      jpegs, png = shapes.render_encoded(scene, cfg.jpeg_quality)
      h.update(json.dumps([i, pair, shapes.describe(scene)], sort_keys=True).encode())
      for j in jpegs:
        h.update(j)
      h.update(png)
  return h.hexdigest()


def test_plain_default_clips_are_byte_identical_to_before():
  assert _digest(_config('default')) == PLAIN_DIGEST


@pytest.mark.parametrize('split', ['train', 'val'])
def test_distractor_clips_are_the_plain_clips_plus_transient_shapes(split):
  plain = list(zip(range(40), shapes_builder.split_items(_config('default'), split)))
  noisy = list(zip(range(40), shapes_builder.split_items(_config('distractors'), split)))
  counts = []
  for (_, (i, pair, a)), (_, (j, pair_b, b)) in zip(plain, noisy):
    assert (i, pair) == (j, pair_b)
    assert a.distractors == () and 1 <= len(b.distractors) <= 2
    assert shapes.describe(a) == shapes.describe(b)  # caption, questions, objects: the same
    counts.append(len(b.distractors))
    frames_a, labels_a = shapes.render_scene(a)
    frames_b, labels_b = shapes.render_scene(b)
    on_d = labels_b == shapes.DISTRACTOR_LABEL
    frames_with = np.flatnonzero(on_d.any(axis=(1, 2)))
    assert 1 <= len(frames_with) <= 2 * len(b.distractors)
    for d in b.distractors:
      assert 1 <= d.frames <= shapes.MAX_DISTRACTOR_FRAMES
      assert 0 <= d.first and d.first + d.frames <= b.num_frames
    # Every distractor pixel is in a frame some distractor is on; elsewhere, the plain clip.
    shown = np.zeros(b.num_frames, bool)
    for d in b.distractors:
      shown[d.first:d.first + d.frames] = True
    assert set(frames_with) <= set(np.flatnonzero(shown))
    np.testing.assert_array_equal(frames_b[~shown], frames_a[~shown])
    np.testing.assert_array_equal(labels_b[~shown], labels_a[~shown])
    # Drawn under the objects: every object pixel of the plain clip is still there.
    obj = (labels_a > 0)
    np.testing.assert_array_equal(labels_b[obj], labels_a[obj])
    np.testing.assert_array_equal(frames_b[obj], frames_a[obj])
    # Not mentioned: their colours are not the clip's, and no text names them.
    texts = ' '.join([shapes.caption(b)] + [q + ' ' + x for q, x in shapes.questions(b)])
    for d in b.distractors:
      assert d.colour not in {o.colour for o in b.objects}
      assert d.colour not in texts.split()
  assert set(counts) == {1, 2}


def test_a_distractor_is_in_at_most_two_frames_of_each_clip():
  for _, (_, _, scene) in zip(range(60), shapes_builder.split_items(_config('distractors'),
                                                                    'test')):
    for d in scene.distractors:
      alone = dataclasses.replace(scene, objects=(), distractors=(d,))
      _, labels = shapes.render_scene(alone)
      assert 1 <= (labels == shapes.DISTRACTOR_LABEL).any(axis=(1, 2)).sum() <= 2


def test_distractor_streams_are_deterministic():
  a = [s for _, (_, _, s) in zip(range(5), shapes_builder.split_items(_config('distractors'),
                                                                      'val'))]
  b = [s for _, (_, _, s) in zip(range(5), shapes_builder.split_items(_config('distractors'),
                                                                      'val'))]
  assert [s.distractors for s in a] == [s.distractors for s in b]


@pytest.mark.parametrize('name', ['tiny_distractors', 'tiny_transients'])
def test_built_transient_variant_has_its_own_dir(tmp_path, name):
  """Both transient variants (distractor shapes, background stains) build into their own dir
  with label-255 pixels, and keep the default clips' ids and captions."""
  builder, model_path = shapes_builder.ensure_shapes(str(tmp_path), name)
  assert name in builder.data_dir and model_path.startswith(builder.data_dir)
  ex = builder.as_data_source('val')[0]
  strip = video_io.decode_label_strip(ex['labels'], len(ex['frames']))
  assert (strip == shapes.DISTRACTOR_LABEL).any()
  assert int(ex['id']) == 0
  plain = list(shapes.generate_split('val', 1, seed=0, render=False))[0]
  assert ex['caption'].decode() == plain['caption']
