"""The transient variant of shapes: stains of the background in 1-2 frames, never in the text,
and the plain clips (ids, texts, objects) unchanged."""
import dataclasses

import numpy as np
import pytest

from clusterstm_jax.data import shapes
from clusterstm_jax.data.builders import shapes as shapes_builder

pytestmark = pytest.mark.unit


def _config(name):
  return next(c for c in shapes_builder.Shapes.BUILDER_CONFIGS if c.name == name)


def _items(name, split, n):
  return [item for _, item in zip(range(n), shapes_builder.split_items(_config(name), split))]


@pytest.mark.parametrize('split', ['train', 'test'])
def test_transient_clips_are_the_plain_clips_plus_stains(split):
  counts = []
  for (i, pair, a), (j, pair_b, b) in zip(_items('default', split, 40),
                                          _items('transients', split, 40)):
    assert (i, pair) == (j, pair_b)
    assert a.stains == () and b.distractors == () and 1 <= len(b.stains) <= 2
    assert shapes.describe(a) == shapes.describe(b)  # caption, questions, objects: the same
    assert dataclasses.replace(b, stains=()) == dataclasses.replace(a, bg_noise=b.bg_noise)
    np.testing.assert_array_equal(a.bg_noise, b.bg_noise)
    counts.append(len(b.stains))
    frames_a, labels_a = shapes.render_scene(a)
    frames_b, labels_b = shapes.render_scene(b)
    on = labels_b == shapes.DISTRACTOR_LABEL
    shown = np.zeros(b.num_frames, bool)
    for st in b.stains:
      assert 1 <= st.frames <= shapes.MAX_DISTRACTOR_FRAMES
      assert 0 <= st.first and st.first + st.frames <= b.num_frames
      shown[st.first:st.first + st.frames] = True
    assert on.any() and set(np.flatnonzero(on.any(axis=(1, 2)))) <= set(np.flatnonzero(shown))
    # Outside the stains, the plain clip; objects are drawn over them, unchanged.
    np.testing.assert_array_equal(frames_b[~on], frames_a[~on])
    np.testing.assert_array_equal(labels_b[~on], labels_a[~on])
    assert not (on & (labels_a > 0)).any()
    # On a stain, the plain background scaled by a modest factor: brighter or darker, same hue.
    lo, hi = shapes.STAIN_SHADE
    for st in b.stains:
      assert lo <= abs(st.gain - 1) <= hi
      alone_a, _ = shapes.render_scene(dataclasses.replace(a, objects=()))
      alone_b, lab = shapes.render_scene(dataclasses.replace(b, objects=(), stains=(st,)))
      mine = lab == shapes.DISTRACTOR_LABEL
      want = np.clip(np.floor(alone_a[mine] * np.float32(st.gain) + 0.5), 0, 255)
      np.testing.assert_array_equal(alone_b[mine], want)
    # No text names them (stains have no colour or shape words at all): texts are the plain ones.
  assert set(counts) == {1, 2}


def test_a_stain_is_labelled_in_one_or_two_consecutive_frames():
  for _, _, scene in _items('transients', 'val', 60):
    for st in scene.stains:
      alone = dataclasses.replace(scene, objects=(), stains=(st,))
      _, labels = shapes.render_scene(alone)
      frames = np.flatnonzero((labels == shapes.DISTRACTOR_LABEL).any(axis=(1, 2)))
      assert 1 <= len(frames) <= 2 and frames.tolist() == list(range(st.first, st.first + st.frames))
      assert set(np.unique(labels)) == {0, shapes.DISTRACTOR_LABEL}


def test_stain_streams_are_deterministic_and_leave_other_variants_alone():
  a, b = _items('transients', 'val', 8), _items('transients', 'val', 8)
  assert [x[2].stains for x in a] == [y[2].stains for y in b]
  assert all(x[2].stains for x in a)
  # The distractor variant draws no stains (its data is as it was), and vice versa.
  assert all(s.stains == () and s.distractors for _, _, s in _items('distractors', 'val', 8))
  frames = [shapes.render_scene(s)[0] for _, _, s in a]
  again = [shapes.render_scene(s)[0] for _, _, s in _items('transients', 'val', 8)]
  for x, y in zip(frames, again):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('kwargs, message', [
    (dict(max_count=0), 'stains per clip must be >= 1, got 0'),
    (dict(max_count=2, shade=(0.3, 0.2)), 'stain shade must be a range 0 < lo <= hi < 1'),
    (dict(max_count=2, shade=(0.0, 0.2)), 'stain shade must be a range 0 < lo <= hi < 1'),
])
def test_bad_stain_arguments_are_one_line_errors(kwargs, message):
  scene = _items('default', 'val', 1)[0][2]
  with pytest.raises(ValueError, match=message) as e:
    shapes.add_stains(scene, np.random.default_rng(0), **kwargs)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='must be >= 0') as e:
    next(shapes.split_scenes('val', 2, 0, stains=-1))
  assert '\n' not in str(e.value)
