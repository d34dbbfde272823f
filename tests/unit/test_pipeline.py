"""Input pipeline: batch layout, decoding, determinism, resume, eval exactly-once, and the
image/video I/O helpers it is built on."""
import av
import numpy as np
import pytest

from clusterstm_jax.data import pipeline, video_io

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  cfg = pipeline.default_data_config()
  cfg.data_dir = str(tmp_path_factory.mktemp("data"))
  cfg.builder_config = "tiny"
  pipeline.get_source(cfg, "train")  # builds once for the module
  return cfg


@pytest.fixture(scope="module")
def tok(data_config):
  return pipeline.get_tokenizer(data_config)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_default_config_fields():
  cfg = pipeline.default_data_config()
  got = (cfg.name, cfg.num_frames, cfg.image_size, cfg.max_text_len, cfg.worker_count)
  assert got == ("shapes", 4, 64, 32, 0)
  assert (cfg.train_split, cfg.eval_split, cfg.tokenizer) == ("train", "test", "")


def test_train_batch_layout(data_config, tok):
  loader = pipeline.make_train_loader(data_config, tok, global_batch_size=8, seed=0,
                                      process_index=0, process_count=1)
  batch = next(iter(loader))
  assert set(batch) == {"video", "text", "labels", "index"}
  assert batch["video"].shape == (8, 4, 64, 64, 3) and batch["video"].dtype == np.uint8
  assert batch["text"].shape == (8, 32) and batch["text"].dtype == np.int32
  assert batch["labels"].shape == (8, 4, 64, 64) and batch["labels"].dtype == np.uint8
  assert batch["index"].shape == (8,) and batch["index"].dtype == np.int32
  assert np.all(batch["text"][:, 0] == tok.cls_id)
  assert len(set(batch["index"].tolist())) == 8  # a shuffled epoch has no repeats in one batch


def test_eval_rows_equal_independent_decoding(data_config, tok):
  source = pipeline.get_source(data_config, "test")
  batch = next(iter(pipeline.make_eval_loader(data_config, tok, global_batch_size=8,
                                              process_index=0, process_count=1)))
  assert batch["index"].tolist() == list(range(8)) and batch["valid"].all()
  for row in (0, 5):
    rec = source[int(batch["index"][row])]
    frames = np.stack([video_io.decode_jpeg(j) for j in rec["frames"]])  # 8 stored frames
    labels = video_io.decode_label_strip(rec["labels"], 8)
    centre = [1, 3, 5, 7]  # middle of each of 4 equal segments of 8 frames
    np.testing.assert_array_equal(batch["video"][row], frames[centre])
    np.testing.assert_array_equal(batch["labels"][row], labels[centre])
    np.testing.assert_array_equal(batch["text"][row], tok.encode_batch([rec["caption"]], 32)[0])


def test_resize_and_frame_count(data_config, tok):
  cfg = data_config.copy_and_resolve_references()
  cfg.image_size, cfg.num_frames = 32, 6
  kw = dict(global_batch_size=4, process_index=0, process_count=1)
  batch = next(iter(pipeline.make_eval_loader(cfg, tok, **kw)))
  assert batch["video"].shape == (4, 6, 32, 32, 3) and batch["labels"].shape == (4, 6, 32, 32)
  full = next(iter(pipeline.make_eval_loader(data_config, tok, **kw)))
  # Nearest-neighbour label resizing invents no object ids.
  for a, b in zip(batch["labels"], full["labels"]):
    assert set(np.unique(a)) <= set(np.unique(b))


def test_non_square_frames_are_cropped_not_stretched(tok):
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 255, size=(8, 48, 80, 3), dtype=np.uint8)  # landscape, like real data
  frames[:, :, 16:64] = 128  # the centred 48x48 square is flat grey (JPEG-block aligned)
  ex = {"frames": [video_io.encode_jpeg(f) for f in frames], "caption": b"a video", "id": 3}
  kw = dict(tokenizer=tok, num_frames=2, image_size=24, max_text_len=8)
  out = pipeline.decode_example(ex, rng=None, **kw)
  assert out["video"].shape == (2, 24, 24, 3) and out["labels"].shape == (2, 24, 24)
  assert not out["labels"].any() and out["index"] == 3
  assert np.abs(out["video"].astype(int) - 128).max() <= 4  # only the centred square was kept
  jittered = pipeline.decode_example(ex, rng=np.random.default_rng(1), **kw)
  assert jittered["video"].shape == (2, 24, 24, 3)


def test_train_determinism_and_jitter(data_config, tok):
  def first(seed):
    return next(iter(pipeline.make_train_loader(data_config, tok, global_batch_size=8, seed=seed,
                                                process_index=0, process_count=1)))
  a, b, c = first(1), first(1), first(2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a["index"].tolist() != c["index"].tolist()
  # Train sampling is jittered: over a batch, some clip's frames differ from the eval frames.
  source = pipeline.get_source(data_config, "train")
  differs = 0
  for row, i in enumerate(a["index"]):
    rec = source[int(i)]
    centre = np.stack([video_io.decode_jpeg(rec["frames"][j]) for j in (1, 3, 5, 7)])
    differs += not np.array_equal(a["video"][row], centre)
  assert differs > 0


def test_resume_gives_identical_batches(data_config, tok):
  def loader():
    return pipeline.make_train_loader(data_config, tok, global_batch_size=8, seed=3,
                                      process_index=0, process_count=1)
  it = iter(loader())
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = iter(loader())
  resumed.set_state(state)
  got = _take(resumed, 2)
  for e, g in zip(expected, got):
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def test_train_shards_are_disjoint(data_config, tok):
  seen = []
  for p in (0, 1):
    it = iter(pipeline.make_train_loader(data_config, tok, global_batch_size=16, seed=0,
                                         process_index=p, process_count=2))
    batches = _take(it, 4)  # 4 x 8 rows of a 256-record shard: within one epoch
    assert batches[0]["video"].shape[0] == 8
    seen.append({int(i) for b in batches for i in b["index"]})
  assert len(seen[0]) == 32 and len(seen[1]) == 32 and not seen[0] & seen[1]


def test_eval_visits_every_example_exactly_once_across_processes(data_config, tok):
  n = len(pipeline.get_source(data_config, "test"))  # 64, not a multiple of 24
  per_process = []
  for p in (0, 1):
    loader = pipeline.make_eval_loader(data_config, tok, global_batch_size=24, process_index=p,
                                       process_count=2)
    per_process.append(list(loader))
  assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(64 / 24) steps on every process
  valid = []
  for batches in per_process:
    for b in batches:
      assert b["video"].shape[0] == 12 and b["valid"].dtype == np.bool_
      valid += b["index"][b["valid"]].tolist()
  assert sorted(valid) == list(range(n))
  padding = sum(int((~b["valid"]).sum()) for batches in per_process for b in batches)
  assert padding == 3 * 24 - n


def test_bad_inputs_are_clear_errors(data_config, tok, tmp_path):
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_train_loader(data_config, tok, global_batch_size=9, seed=0, process_index=0,
                               process_count=2)
  cfg = data_config.copy_and_resolve_references()
  cfg.name = "nope"
  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    pipeline.get_source(cfg, "train")
  cfg.name, cfg.data_dir, cfg.builder_config = "msrvtt", str(tmp_path), ""  # '': its first config
  with pytest.raises(ValueError, match=f"MSR-VTT.*{tmp_path}/manual/msrvtt"):
    pipeline.get_source(cfg, "train")
  with pytest.raises(ValueError, match="needs config.data.tokenizer"):
    pipeline.get_tokenizer(cfg)
  cfg.tokenizer = str(tmp_path / "missing.model")
  with pytest.raises(ValueError, match="tokenizer model not found"):
    pipeline.tokenizer_path(cfg)
  with pytest.raises(ValueError, match="has no split"):
    pipeline.get_source(data_config, "validation")


@pytest.mark.slow
def test_worker_process_gives_the_same_batches(data_config, tok):
  cfg = data_config.copy_and_resolve_references()
  cfg.worker_count = 1
  kw = dict(global_batch_size=4, seed=5, process_index=0, process_count=1)
  a = _take(iter(pipeline.make_train_loader(data_config, tok, **kw)), 2)
  b = _take(iter(pipeline.make_train_loader(cfg, tok, **kw)), 2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---- image and video I/O ----

def test_png_and_jpeg_round_trips():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(3, 16, 24), dtype=np.uint8)
  strip = video_io.encode_label_strip(labels)
  np.testing.assert_array_equal(video_io.decode_label_strip(strip, 3), labels)
  smooth = np.repeat(np.repeat(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8), 8, 0), 8, 1)
  back = video_io.decode_jpeg(video_io.encode_jpeg(smooth))
  assert back.shape == smooth.shape and np.abs(back.astype(int) - smooth).mean() < 3
  with pytest.raises(ValueError, match="uint8"):
    video_io.encode_jpeg(smooth.astype(np.float32))


def test_sample_frame_indices():
  np.testing.assert_array_equal(video_io.sample_frame_indices(8, 4), [1, 3, 5, 7])
  np.testing.assert_array_equal(video_io.sample_frame_indices(2, 4), [0, 0, 1, 1])
  rng = np.random.default_rng(0)
  for _ in range(20):
    idx = video_io.sample_frame_indices(12, 4, rng)
    assert all(3 * k <= i < 3 * (k + 1) for k, i in enumerate(idx))  # one per segment


def _write_mp4(path, num_frames=12, height=32, width=48):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(num_frames):  # frame i is a flat grey of level 20 * i
      grey = np.full((height, width, 3), 20 * i, np.uint8)
      frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def test_read_video_frames(tmp_path):
  path = tmp_path / "clip.mp4"
  _write_mp4(path)
  frames = video_io.read_video_frames(path, 4)
  assert frames.shape == (4, 32, 48, 3) and frames.dtype == np.uint8
  # Segment middles of 12 frames in 4 segments: frames 1, 4, 7, 10.
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [20, 80, 140, 200], atol=3)
  small = video_io.read_video_frames(path, 3, size=16, rng=np.random.default_rng(0))
  assert small.shape == (3, 16, 16, 3)
  levels = small.mean(axis=(1, 2, 3)) / 20
  for k, level in enumerate(levels):  # jittered, but inside its third of the clip
    assert 4 * k - 0.2 <= level <= 4 * k + 3.2
  with pytest.raises(ValueError, match="not found"):
    video_io.read_video_frames(tmp_path / "missing.mp4", 4)
