"""The shapes generator and its TFDS builder: determinism, content, eval guarantees, storage."""
import os

import numpy as np
import pytest

from clusterstm_jax.data import shapes, video_io
from clusterstm_jax.data.builders import shapes as shapes_builder

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  builder, model_path = shapes_builder.ensure_shapes(str(data_dir), "tiny")
  return data_dir, builder, model_path


def _eroded(mask: np.ndarray) -> np.ndarray:
  """Pixels whose 4 neighbours are in the mask too (away from JPEG-blurred edges)."""
  m = mask.copy()
  m[1:] &= mask[:-1]
  m[:-1] &= mask[1:]
  m[:, 1:] &= mask[:, :-1]
  m[:, :-1] &= mask[:, 1:]
  return m


def test_generate_clip_is_deterministic_and_seed_dependent():
  a = shapes.generate_clip(np.random.default_rng(7))
  b = shapes.generate_clip(np.random.default_rng(7))
  c = shapes.generate_clip(np.random.default_rng(8))
  assert a["frames"].shape == (8, 64, 64, 3) and a["frames"].dtype == np.uint8
  assert a["labels"].shape == (8, 64, 64) and a["labels"].dtype == np.uint8
  np.testing.assert_array_equal(a["frames"], b["frames"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  assert a["caption"] == b["caption"] and a["questions"] == b["questions"]
  assert not np.array_equal(a["frames"], c["frames"])


def test_splits_are_deterministic_and_disjoint():
  first = [ex["caption"] for ex in shapes.generate_split("test", 30, seed=0, render=False)]
  again = [ex["caption"] for ex in shapes.generate_split("test", 30, seed=0, render=False)]
  other_seed = [ex["caption"] for ex in shapes.generate_split("test", 30, seed=1, render=False)]
  train = list(shapes.generate_split("train", 30, seed=0))
  test = list(shapes.generate_split("test", 30, seed=0))
  assert first == again
  assert first != other_seed
  # Different streams: no train clip equals a test clip pixel for pixel.
  for tr in train:
    assert not any(np.array_equal(tr["frames"], te["frames"]) for te in test)


def test_labels_match_rendered_pixels_and_motion():
  rng = np.random.default_rng(3)
  for _ in range(40):
    scene = shapes.sample_scene(rng)
    frames, labels = shapes.render_scene(scene)
    background = np.all(labels == 0, axis=0)
    # Background is static: where no object ever is, every frame shows the same pixels.
    still = frames[:, background]
    np.testing.assert_array_equal(still, np.broadcast_to(still[0], still.shape))
    for k, obj in enumerate(scene.objects):
      colour = np.clip(np.add(shapes.COLOURS[obj.colour], obj.tint), 0, 255)
      mask = labels == k + 1
      # Every labelled pixel has exactly the object's colour.
      np.testing.assert_array_equal(frames[mask], np.broadcast_to(colour, frames[mask].shape))
      # The object is visible mid-clip, and its label centroid moves in the named direction.
      area = mask.sum(axis=(1, 2))
      assert area[3] > 0 and area[4] > 0
      if k == len(scene.objects) - 1:  # the top object is never occluded: exact motion check
        ys, xs = [np.array([np.nonzero(m)[i].mean() for m in mask]) for i in (0, 1)]
        dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
        expect = np.array(shapes.MOTIONS[obj.motion]) * scene.travel  # first to last frame
        np.testing.assert_allclose([dx, dy], expect, atol=1.0)
        r = shapes.SIZES[obj.size]
        if obj.shape == "circle":  # area of the unoccluded top object vs pi r^2
          np.testing.assert_allclose(area, np.pi * r * r, rtol=0.15)


def test_caption_and_questions_describe_every_object():
  rng = np.random.default_rng(11)
  for _ in range(50):
    scene = shapes.sample_scene(rng)
    d = shapes.describe(scene)
    cap = d["caption"]
    for o in scene.objects:
      assert f"{o.size} {o.colour} {o.shape}" in cap
      assert f"{o.size} {o.colour} {o.shape} {shapes._FINITE[o.motion]}" in cap or \
          f"{o.size} {o.colour} {o.shape} {shapes._GERUND[o.motion]}" in cap
    qa = dict(zip(d["questions"], d["answers"]))
    assert set(d["answers"]) <= set(shapes.ANSWER_VOCAB)
    assert qa["how many shapes are there?"] == shapes.COUNT_WORDS[len(scene.objects)]
    moving = sum(o.motion != "still" for o in scene.objects)
    assert qa["how many shapes are moving?"] == shapes.COUNT_WORDS[moving]
    for o in scene.objects:
      assert qa[f"which way is the {o.colour} {o.shape} moving?"] == o.motion
      assert qa[f"what shape is the {o.colour} object?"] == o.shape
      assert qa[f"what size is the {o.colour} {o.shape}?"] == o.size
    assert len(d["objects"]["colour"]) == len(scene.objects)


def test_eval_split_captions_unique_and_motion_pairs():
  exs = list(shapes.generate_split("val", 300, seed=0))
  captions = [e["caption"] for e in exs]
  assert len(set(captions)) == len(captions)
  fields = ("size", "colour", "shape", "motion")
  keys = [tuple(sorted(zip(*[e["objects"][k] for k in fields]))) for e in exs]
  assert len(set(keys)) == len(keys)  # unique content, not only unique wording
  pairs = [(e, exs[e["pair"]]) for e in exs if e["pair"] > e["id"]]
  assert len(pairs) >= 50
  for a, b in pairs:
    assert b["pair"] == a["id"]
    for k in ("colour", "size", "shape"):
      assert a["objects"][k] == b["objects"][k]
    assert a["objects"]["motion"] != b["objects"]["motion"]
    # Same background: pixels that are background in both clips are identical in every frame.
    both_bg = (a["labels"] == 0) & (b["labels"] == 0)
    np.testing.assert_array_equal(a["frames"][both_bg], b["frames"][both_bg])
    assert not np.array_equal(a["frames"], b["frames"])


def test_built_dataset_layout_and_reuse(built):
  data_dir, builder, model_path = built
  assert model_path == os.path.join(builder.data_dir, "spm", "shapes.model")
  assert os.path.isfile(model_path)
  assert not [p for p in os.listdir(os.path.dirname(builder.data_dir)) if "incomplete" in p]
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {"train": 512, "val": 64, "test": 64}
  mtime = os.path.getmtime(model_path)
  again, path_again = shapes_builder.ensure_shapes(str(data_dir), "tiny")
  assert path_again == model_path and os.path.getmtime(model_path) == mtime


def test_stored_examples_match_generator(built):
  _, builder, _ = built
  source = builder.as_data_source("test")
  expected = list(shapes.generate_split("test", 64, seed=0))
  for i in (0, 1, 17, 63):
    rec, exp = source[i], expected[i]
    assert rec["id"] == i and rec["pair"] == exp["pair"]
    assert rec["caption"].decode() == exp["caption"]
    assert [q.decode() for q in rec["questions"]] == exp["questions"]
    assert [m.decode() for m in rec["objects"]["motion"]] == exp["objects"]["motion"]
    # Label maps are lossless and match the render exactly.
    labels = video_io.decode_label_strip(rec["labels"], len(rec["frames"]))
    np.testing.assert_array_equal(labels, exp["labels"])
    # JPEG is lossy: inside each object (away from its edges) the decoded colour is close.
    frames = np.stack([video_io.decode_jpeg(j) for j in rec["frames"]]).astype(np.int32)
    assert np.abs(frames - exp["frames"]).mean() < 4
    for k, name in enumerate(exp["objects"]["colour"]):
      inside = np.stack([_eroded(m) for m in labels == k + 1])
      if inside.sum() > 20:
        mean = frames[inside].mean(axis=0)
        assert np.abs(mean - np.array(shapes.COLOURS[name])).max() < 25, (name, mean)


def test_stored_eval_split_unique_and_paired(built):
  _, builder, _ = built
  source = builder.as_data_source("val")
  recs = [source[i] for i in range(len(source))]
  captions = [r["caption"] for r in recs]
  assert len(set(captions)) == len(captions)
  assert sum(r["pair"] >= 0 for r in recs) >= 10


def test_interrupted_build_never_reads_as_complete(tmp_path, monkeypatch):
  calls = {"n": 0}
  real = shapes.render_encoded

  def failing(scene, jpeg_quality=90):
    calls["n"] += 1
    if calls["n"] > 20:
      raise RuntimeError("simulated crash")
    return real(scene, jpeg_quality)

  monkeypatch.setattr(shapes, "render_encoded", failing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    shapes_builder.ensure_shapes(str(tmp_path), "tiny")
  version_dir = tmp_path / "shapes" / "tiny" / "1.0.0"
  assert not version_dir.exists()
  assert not (version_dir / "spm" / "shapes.model").exists()


def test_unknown_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown shapes builder config"):
    shapes_builder.ensure_shapes(str(tmp_path), "huge")
