"""The real-dataset builders' machinery on tiny fixtures (tests/unit/builder_fixtures.py): media
decoding, one-line errors, interrupted builds, worker processes and a crashing decoder, the
registry, and the input pipeline reading a built dataset."""
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clusterstm_jax.data import builders, video_io
from clusterstm_jax.data.builders import common, media, real
from clusterstm_jax.errors import UserError
from tests.unit.builder_fixtures import (SIZE, STORED_HW, T, assert_video, build, didemo_fixture,
                                         frame_g, records, write_corrupt, write_json, write_video)

pytestmark = pytest.mark.unit


# ----- media decoding -----

def test_read_video_takes_the_frames_at_segment_middles(tmp_path):
  path = tmp_path / "v.mp4"
  write_video(path, v=2)
  for num in (3, 4, 12):  # 12 > 10 frames: frames repeat, as in sample_frame_indices
    out = media.read_video(path, num, SIZE)
    assert out.shape == (num, *STORED_HW, 3)
    want = video_io.sample_frame_indices(10, num)
    np.testing.assert_allclose(out[..., 1].astype(int).mean(axis=(1, 2)), [frame_g(i) for i in want], atol=6)
    by_index = media._read_by_index(str(path), num, SIZE).astype(int)  # the fallback path
    np.testing.assert_allclose(by_index[..., 1].mean(axis=(1, 2)), [frame_g(i) for i in want], atol=6)


def test_read_video_seeks_in_long_videos(tmp_path):
  # 300 frames (30 s), a keyframe every 10: targets 7.5 s apart make the reader seek.
  path = tmp_path / "long.mp4"
  write_video(path, n=300, w=32, h=32, gop=10, blue=lambda i: 20 + 28 * (i // 12 % 8))
  want = video_io.sample_frame_indices(300, 4)
  for gap in (3.0, 1e9):  # with seeks, and decoding straight through
    out = media.read_video(path, 4, 8, seek_gap_s=gap).astype(int)
    np.testing.assert_allclose(out[..., 1].mean(axis=(1, 2)), [frame_g(i) for i in want], atol=6)
    np.testing.assert_allclose(out[..., 2].mean(axis=(1, 2)), [20 + 28 * (i // 12 % 8) for i in want], atol=6)
  by_index = media._read_by_index(str(path), 4, 8).astype(int)
  np.testing.assert_allclose(by_index[..., 1].mean(axis=(1, 2)), [frame_g(i) for i in want], atol=6)


def test_load_media_reports_missing_and_corrupt(tmp_path):
  write_corrupt(tmp_path / "bad.mp4")
  task = media.MediaTask(str(tmp_path / "bad.mp4"), False, 2, 8, 90)
  jpegs, error = media.load_media(task)
  assert jpegs is None and error != media.MISSING and "\n" not in error
  assert media.load_media(task._replace(path=str(tmp_path / "none.mp4"))) == (None, media.MISSING)
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "im.png")
  jpegs, error = media.load_media(media.MediaTask(str(tmp_path / "im.png"), True, 1, 15, 90))
  assert error is None and video_io.decode_jpeg(jpegs[0]).shape == (15, 20, 3)


# ----- errors, interruption, registry -----

def test_missing_manual_dir_or_annotation_is_one_clear_line(tmp_path):
  with pytest.raises(UserError, match=r"MSR-VTT: .*manual.*msrvtt.*missing or empty") as e:
    build("msrvtt", tmp_path / "data", config="1ka")
  assert "\n" not in str(e.value)
  root = tmp_path / "manual"
  write_video(root / "videos" / "v_A.mp4", 0)
  with pytest.raises(UserError, match=r"ActivityNet Captions: .*train.json") as e:
    build("activitynet", tmp_path / "data", root)
  assert "\n" not in str(e.value)
  write_json(root / "train.json", {"v_X": {"timestamps": [[0, 1]], "sentences": ["s"]}})
  write_json(root / "val_1.json", {"v_A": {"timestamps": [[0, 1]], "sentences": ["s"]}})
  with pytest.raises(UserError, match=r"split 'train' has no usable media"):
    build("activitynet", tmp_path / "data", root)


def test_interrupted_build_is_not_prepared_and_rebuilds(tmp_path, monkeypatch):
  root, data = tmp_path / "manual", tmp_path / "data"
  didemo_fixture(root)
  calls = []
  original = media.load_media

  def interrupted(task):
    calls.append(task)
    if len(calls) == 3:
      raise KeyboardInterrupt  # Ctrl-C in the middle of the train split
    return original(task)

  monkeypatch.setattr(media, "load_media", interrupted)
  with pytest.raises(KeyboardInterrupt):
    build("didemo", data, root)
  monkeypatch.setattr(media, "load_media", original)
  fresh = real.get_builder("didemo", data, num_frames=T, image_size=SIZE)
  assert not os.path.exists(fresh.data_dir)
  with pytest.raises(Exception):
    fresh.as_data_source("train")

  # A killed process (no cleanup at all) leaves only an incomplete.* directory behind.
  pid = os.fork()
  if pid == 0:  # child: die without unwinding after two videos
    try:
      count = []

      def killed(task):
        count.append(task)
        if len(count) == 3:
          os._exit(17)
        return original(task)

      media.load_media = killed
      build("didemo", data, root)
    finally:
      os._exit(1)
  _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 17
  parent = os.path.dirname(fresh.data_dir)
  assert any(name.startswith("incomplete") for name in os.listdir(parent))
  fresh = real.get_builder("didemo", data, num_frames=T, image_size=SIZE)
  assert not os.path.exists(fresh.data_dir)
  with pytest.raises(Exception):
    fresh.as_data_source("train")

  b = build("didemo", data, root)
  assert [r["video_id"] for r in records(b, "train")] == [f"vid{v}.mp4".encode() for v in range(4)]
  assert_video(records(b, "test")[3], 3)


def test_a_builder_made_before_another_build_reads_it(tmp_path):
  root = tmp_path / "manual"
  didemo_fixture(root, n=2)
  early = real.get_builder("didemo", tmp_path / "data", num_frames=T, image_size=SIZE, workers=0)
  build("didemo", tmp_path / "data", root)
  for path in root.rglob("*.mp4"):
    path.unlink()  # once built, the downloaded files are not read again
  early.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert [r["caption"] for r in records(early, "test")] == [b"d0", b"d1"]


def test_worker_processes_store_the_same_records(tmp_path):
  root = tmp_path / "manual"
  didemo_fixture(root, n=3)
  write_corrupt(root / "videos" / "vid1.mp4")
  one = build("didemo", tmp_path / "a", root, workers=0)
  pool = build("didemo", tmp_path / "b", root, workers=1, chunk=2)
  for split in ("train", "val", "test"):
    a, b = records(one, split), records(pool, split)
    assert [r["video_id"] for r in a] == [r["video_id"] for r in b] == [b"vid0.mp4", b"vid2.mp4"]
    for x, y in zip(a, b):
      assert list(x["frames"]) == list(y["frames"])
  assert one.skipped() == pool.skipped()


def crash_on_marked_files(task):
  """A decoder that dies like a segfaulting one on files named *crash*."""
  if os.path.basename(task.path).startswith("crash"):
    os._exit(11)
  return media.load_media(task)


def test_a_crashing_decoder_costs_only_its_file(tmp_path):
  paths = []
  for v in range(5):
    paths.append(str(tmp_path / (f"crash{v}.mp4" if v == 2 else f"v{v}.mp4")))
    write_video(paths[-1], v)
  items = [(common.Item(str(v), p, {}), media.MediaTask(p, False, T, SIZE, 90)) for v, p in enumerate(paths)]
  pool = common.DecodePool(1, crash_on_marked_files)
  try:
    out = list(common._ordered_load(items, pool, chunk=3))
  finally:
    pool.close()
  assert [item.video_id for item, _ in out] == ["0", "1", "2", "3", "4"]
  assert out[2][1] == (None, common.DecodePool.CRASHED)
  for v in (0, 1, 3, 4):
    assert_video({"frames": out[v][1][0], "video_id": str(v)}, v)


def test_registry_and_get_builder(tmp_path):
  assert set(real.REAL_DATASETS) == {"msrvtt", "msvd", "didemo", "activitynet", "webvid", "cc3m",
                                    "folder"}
  for name, cls in real.REAL_DATASETS.items():
    assert cls.name == name and tfds.builder_cls(name) is cls
    assert cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
  b = real.get_builder("msrvtt", tmp_path, "official", workers=0)
  assert b.builder_config.name == "official" and b.builder_config.num_frames == 8
  assert real.get_builder("msrvtt", tmp_path, "qa", num_frames=8).builder_config.name == "qa"
  assert real.get_builder("msrvtt", tmp_path, "default").builder_config.name == "1ka"  # the first
  assert real.get_builder("webvid", tmp_path, image_size=160).builder_config.name == "default_s160"
  custom = real.get_builder("msrvtt", tmp_path, "1ka_s160_f16").builder_config  # a custom name
  assert (custom.name, custom.task, custom.num_frames, custom.image_size) == ("1ka_f16_s160", "1ka", 16, 160)
  with pytest.raises(UserError, match="unknown real dataset"):
    real.get_builder("kinetics", tmp_path)
  with pytest.raises(UserError, match="no config"):
    real.get_builder("msrvtt", tmp_path, "2k")
  with pytest.raises(UserError, match="unknown option"):
    real.get_builder("msrvtt", tmp_path, fps=2)
  with pytest.raises(UserError, match="holds images"):
    real.get_builder("cc3m", tmp_path, num_frames=4)


def test_pipeline_reads_a_real_dataset(tmp_path):
  from clusterstm_jax.data import pipeline

  root = builders.manual_dir(str(tmp_path), "didemo")
  didemo_fixture(pathlib.Path(root), n=2)
  cfg = pipeline.default_data_config()
  cfg.update({"name": "didemo", "data_dir": str(tmp_path), "builder_config": "default"})
  source = pipeline.get_source(cfg, "val")
  assert len(source) == 2 and source[1]["caption"] == b"d1"
  frames = [video_io.decode_jpeg(j) for j in source[1]["frames"]]
  assert len(frames) == 8 and frames[0].shape == (224, 336, 3)  # registered config: 8 frames, 224
