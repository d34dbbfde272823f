"""Real-dataset TFDS builders, built from tiny fixtures in each dataset's published layout.

Every fixture video is written with PyAV and encodes what it is: frame i of video v has red
level VIDEO_R(v) and green level FRAME_G(i), so a test can tell from the stored JPEGs which
video and which frames a record holds.
"""
import json
import os
import pathlib

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clusterstm_jax.data import builders, video_io
from clusterstm_jax.data.builders import common, media, real
from clusterstm_jax.errors import UserError

T, SIZE = 3, 16  # stored frames per video and short side in the builds below
W, H = 48, 32  # fixture videos: 10 frames of 48x32 at 10 fps -> stored 16x24
STORED_HW = (16, 24)


def video_r(v: int) -> int:
  return 40 + 30 * (v % 6)


def frame_g(i: int) -> int:
  return 10 + 20 * (i % 12)


def write_video(path, v: int = 0, n: int = 10, w: int = W, h: int = H, fps: int = 10,
                codec: str | None = None, gop: int | None = None, blue=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  codec = codec or ("mpeg4" if str(path).endswith(".avi") else "libx264")
  with av.open(str(path), "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if gop:
      s.codec_context.gop_size = gop
    for i in range(n):
      frame = np.empty((h, w, 3), np.uint8)
      frame[..., 0], frame[..., 1] = video_r(v), frame_g(i)
      frame[..., 2] = 128 if blue is None else blue(i)
      for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def write_corrupt(path, seed: int = 0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(seed).bytes(2000))


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_text(path, text: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def build(name, data_dir, manual=None, config=None, **kwargs):
  kwargs = {"workers": 0, "num_frames": T, "image_size": SIZE, **kwargs}
  b = real.get_builder(name, data_dir, config, **kwargs)
  dl = tfds.download.DownloadConfig(manual_dir=str(manual)) if manual else None
  b.download_and_prepare(download_config=dl)
  return b


def records(b, split):
  src = b.as_data_source(split)
  return [src[i] for i in range(len(src))]


def assert_video(rec, v: int, frames=(1, 5, 8)):
  """The record holds frames `frames` of fixture video v, stored with the short side SIZE."""
  imgs = np.stack([video_io.decode_jpeg(j) for j in rec["frames"]]).astype(int)
  assert imgs.shape == (len(frames), *STORED_HW, 3)
  assert np.abs(imgs[..., 0].mean(axis=(1, 2)) - video_r(v)).max() < 8, rec["video_id"]
  np.testing.assert_allclose(imgs[..., 1].mean(axis=(1, 2)), [frame_g(i) for i in frames], atol=6)


def texts(array):
  return [t.decode() for t in array]


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


# ----- MSR-VTT -----

def test_msrvtt_1ka_from_the_default_manual_dir(tmp_path):
  root = tmp_path / "data" / "manual" / "msrvtt"  # builders.manual_dir(data_dir, 'msrvtt')
  for v in (0, 1, 2, 4, 5):
    write_video(root / "videos" / "all" / f"video{v}.mp4", v)
  write_corrupt(root / "videos" / "all" / "video3.mp4")
  # Frozen-in-time's COCO-style MSR_VTT.json; CLIP4Clip's 1k-A csvs.
  write_json(root / "annotation" / "MSR_VTT.json", {"annotations": [
      {"image_id": f"video{v}", "caption": f"clip {v} caption {k}", "id": 3 * v + k}
      for v in range(10) for k in range(3)]})
  write_text(root / "msrvtt_data" / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\nvideo2\nvideo3\n")
  write_text(root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv",
             "key,vid_key,video_id,sentence\nret0,msr4,video4,a dog runs\n"
             "ret1,msr9,video9,not downloaded\nret2,msr5,video5,a cat sits\n")
  b = build("msrvtt", tmp_path / "data", config="1ka")
  assert b.builder_config.name == "1ka_f3_s16"
  train, test = records(b, "train"), records(b, "test")
  assert [r["id"] for r in train] == [0, 1, 2]
  assert [r["video_id"] for r in train] == [b"video0", b"video1", b"video2"]
  assert texts(train[1]["captions"]) == [f"clip 1 caption {k}" for k in range(3)]
  assert train[1]["caption"] == b"clip 1 caption 0"
  for rec, v in zip(train, (0, 1, 2)):
    assert_video(rec, v)
  assert [(r["video_id"], r["caption"]) for r in test] == [(b"video4", b"a dog runs"), (b"video5", b"a cat sits")]
  assert_video(test[1], 5)
  report = b.skipped()
  assert (report["train"]["unreadable"], report["train"]["missing"], report["train"]["kept"]) == (1, 0, 3)
  assert report["train"]["first"][0]["video_id"] == "video3"
  assert (report["test"]["missing"], report["test"]["unreadable"], report["test"]["total"]) == (1, 0, 3)
  assert os.path.isfile(os.path.join(b.data_dir, common.SKIPPED_FILE))


def test_msrvtt_official_split_from_the_challenge_jsons(tmp_path):
  root = tmp_path / "manual"
  for v in range(4):
    write_video(root / "videos" / "all" / f"video{v}.mp4", v)
  split = {0: "train", 1: "validate", 2: "test", 3: "train"}
  write_json(root / "train_val_videodatainfo.json", {
      "videos": [{"video_id": f"video{v}", "split": split[v], "id": v} for v in (0, 1, 3)],
      "sentences": [{"video_id": f"video{v}", "caption": f"c{v}", "sen_id": v} for v in (0, 1, 3)]})
  write_json(root / "test_videodatainfo.json", {
      "videos": [{"video_id": "video2", "split": "test", "id": 2}],
      "sentences": [{"video_id": "video2", "caption": "c2a", "sen_id": 9},
                    {"video_id": "video2", "caption": "c2b", "sen_id": 10}]})
  b = build("msrvtt", tmp_path / "data", root, config="official")
  assert [r["video_id"] for r in records(b, "train")] == [b"video0", b"video3"]
  assert [r["video_id"] for r in records(b, "val")] == [b"video1"]
  (test,) = records(b, "test")
  assert texts(test["captions"]) == ["c2a", "c2b"]
  assert_video(test, 2)


def test_msrvtt_official_split_by_index_when_the_json_has_none(tmp_path):
  root = tmp_path / "manual"
  for v, clip in enumerate((0, 6513, 7010)):
    write_video(root / "videos" / "all" / f"video{clip}.mp4", v)
  # CLIP4Clip's MSRVTT_data.json: every video is marked 'train'.
  write_json(root / "msrvtt_data" / "MSRVTT_data.json", {
      "videos": [{"video_id": f"video{c}", "split": "train"} for c in range(10000)],
      "sentences": [{"video_id": f"video{c}", "caption": f"c{c}"} for c in (0, 6513, 7010)]})
  b = build("msrvtt", tmp_path / "data", root, config="official")
  for split, clip, v in (("train", 0, 0), ("val", 6513, 1), ("test", 7010, 2)):
    (rec,) = records(b, split)
    assert rec["video_id"] == f"video{clip}".encode() and rec["caption"] == f"c{clip}".encode()
    assert_video(rec, v)
  assert [b.skipped()[s]["total"] for s in ("train", "val", "test")] == [6513, 497, 2990]


def test_msrvtt_qa_groups_questions_by_video(tmp_path):
  root = tmp_path / "manual"
  for v in (0, 1, 2):
    write_video(root / "videos" / "all" / f"video{v}.mp4", v)
  write_json(root / "qa" / "train_qa.json", [
      {"question": "what is shown?", "answer": "dog", "video_id": 0, "id": 0, "category_id": 0},
      {"question": "who runs?", "answer": "man", "video_id": 1, "id": 1, "category_id": 1},
      {"question": "what colour?", "answer": "red", "video_id": 0, "id": 2, "category_id": 2}])
  write_json(root / "qa" / "val_qa.json", [{"question": "q", "answer": "a", "video_id": 2, "id": 3}])
  write_json(root / "qa" / "test_qa.json", [{"question": "q2", "answer": "b", "video_id": 2, "id": 4}])
  b = build("msrvtt", tmp_path / "data", root, config="qa")
  train = records(b, "train")
  assert [r["video_id"] for r in train] == [b"video0", b"video1"]
  assert texts(train[0]["questions"]) == ["what is shown?", "what colour?"]
  assert texts(train[0]["answers"]) == ["dog", "red"]
  assert list(train[0]["question_ids"]) == [0, 2]
  assert train[0]["caption"] == b"" and len(train[0]["captions"]) == 0  # no caption json here
  assert_video(train[1], 1)
  assert len(records(b, "val")) == len(records(b, "test")) == 1


# ----- MSVD -----

def test_msvd_standard_split_from_the_mapping(tmp_path):
  root = tmp_path / "manual"
  # youtube_mapping.txt names all 1970 clips; only a few were downloaded.
  write_text(root / "youtube_mapping.txt", "".join(f"yt{i}_1_5 vid{i}\n" for i in range(1, 1971)))
  present = {1: 0, 2: 1, 1201: 2, 1301: 3}  # clip number -> fixture video
  for clip, v in present.items():
    write_video(root / "YouTubeClips" / f"yt{clip}_1_5.avi", v)
  write_corrupt(root / "YouTubeClips" / "yt3_1_5.avi")
  write_text(root / "AllVideoDescriptions.txt",
             "# Microsoft Research Video Description Corpus\n#\n"
             "yt1_1_5 A man is cutting an onion.\nyt1_1_5 Someone slices onions.\n"
             "yt1201_1_5 A cat plays.\n")
  b = build("msvd", tmp_path / "data", root, config="official")
  train = records(b, "train")
  assert [r["video_id"] for r in train] == [b"yt1_1_5", b"yt2_1_5"]
  assert texts(train[0]["captions"]) == ["A man is cutting an onion.", "Someone slices onions."]
  assert_video(train[1], 1)
  assert [r["caption"] for r in records(b, "val")] == [b"A cat plays."]
  assert_video(records(b, "test")[0], 3)
  report = b.skipped()
  assert (report["train"]["total"], report["train"]["unreadable"], report["train"]["missing"]) == (1200, 1, 1197)
  assert (report["val"]["total"], report["test"]["total"]) == (100, 670)


def test_msvd_qa_maps_vid_numbers_to_clips(tmp_path):
  root = tmp_path / "manual"
  write_text(root / "youtube_mapping.txt", "abc_0_4 vid1\ndef_2_9 vid2\n")
  write_video(root / "YouTubeClips" / "abc_0_4.avi", 4)
  write_video(root / "YouTubeClips" / "def_2_9.avi", 5)
  write_json(root / "qa" / "train_qa.json", [{"question": "who?", "answer": "man", "video_id": 2, "id": 7},
                                             {"question": "what?", "answer": "ball", "video_id": 1, "id": 8}])
  write_json(root / "qa" / "val_qa.json", [{"question": "q", "answer": "a", "video_id": 1, "id": 9}])
  write_json(root / "qa" / "test_qa.json", [{"question": "q", "answer": "a", "video_id": 2, "id": 10}])
  b = build("msvd", tmp_path / "data", root, config="qa")
  train = records(b, "train")
  assert [r["video_id"] for r in train] == [b"abc_0_4", b"def_2_9"]  # mapping order
  assert texts(train[1]["questions"]) == ["who?"] and list(train[1]["question_ids"]) == [7]
  assert_video(train[1], 5)


# ----- paragraph datasets -----

def test_didemo_paragraphs_in_temporal_order(tmp_path):
  root = tmp_path / "manual"
  write_video(root / "videos" / "111@N00_222_abc.mp4", 0)  # json says .mov, converted to .mp4
  write_video(root / "videos" / "333@N01_444_def.avi", 1)
  write_corrupt(root / "videos" / "555@N02_666_ghi.mp4")
  entries = [
      {"annotation_id": 1, "video": "111@N00_222_abc.mov", "description": "the dog sits down",
       "times": [[2, 3], [2, 3], [1, 3], [2, 3]], "num_segments": 6},
      {"annotation_id": 2, "video": "111@N00_222_abc.mov", "description": "a dog walks in",
       "times": [[0, 0], [0, 1], [0, 0], [0, 0]], "num_segments": 6},
      {"annotation_id": 3, "video": "555@N02_666_ghi.mp4", "description": "unreadable",
       "times": [[0, 0]], "num_segments": 6}]
  write_json(root / "train_data.json", entries)
  write_json(root / "val_data.json", [{"video": "333@N01_444_def.avi", "description": "x",
                                       "times": [[1, 1]], "annotation_id": 4}])
  write_json(root / "test_data.json", [{"video": "333@N01_444_def.avi", "description": "y",
                                        "times": [[4, 5]], "annotation_id": 5}])
  b = build("didemo", tmp_path / "data", root)
  (rec,) = records(b, "train")
  assert rec["caption"] == b"a dog walks in the dog sits down"
  assert texts(rec["captions"]) == ["a dog walks in", "the dog sits down"]
  np.testing.assert_allclose(rec["segments"], [[0, 5], [10, 20]])
  assert_video(rec, 0)
  assert_video(records(b, "val")[0], 1)
  assert b.skipped()["train"]["unreadable"] == 1


def test_activitynet_paragraphs_and_optional_val2(tmp_path):
  root = tmp_path / "manual"
  write_video(root / "videos" / "v_AAA.mp4", 0)
  write_video(root / "videos" / "BBB.mkv", 1)  # downloaded without the v_ prefix
  write_json(root / "train.json", {
      "v_AAA": {"duration": 1.0, "timestamps": [[0.5, 0.9], [0.0, 0.4]],
                "sentences": ["Then he jumps. ", "A man runs."]},
      "v_ZZZ": {"duration": 3.0, "timestamps": [[0, 1]], "sentences": ["Not downloaded."]}})
  write_json(root / "val_1.json", {"v_BBB": {"duration": 1.0, "timestamps": [[0, 1]],
                                             "sentences": ["A woman sings."]}})
  b = build("activitynet", tmp_path / "data", root)
  assert set(b.info.splits) == {"train", "val_1"}
  (rec,) = records(b, "train")
  assert rec["caption"] == b"A man runs. Then he jumps."
  np.testing.assert_allclose(rec["segments"], [[0.0, 0.4], [0.5, 0.9]])
  assert_video(rec, 0)
  assert_video(records(b, "val_1")[0], 1)
  assert b.skipped()["train"]["missing"] == 1


# ----- pretraining corpora -----

def test_webvid_reads_the_csv_and_page_dirs(tmp_path):
  root = tmp_path / "manual"
  write_video(root / "videos" / "000001_000050" / "31353427.mp4", 0)
  write_video(root / "videos" / "000051_000100" / "14781349.mp4", 1)
  write_corrupt(root / "videos" / "000051_000100" / "999.mp4")
  header = "videoid,contentUrl,duration,page_dir,name\n"
  write_text(root / "results_2M_train.csv", header
             + "31353427,https://x/1.mp4,PT00H00M12S,000001_000050,\"Aerial, shot of a lake\"\n"
             + "999,https://x/2.mp4,PT00H00M10S,000051_000100,corrupt\n"
             + "555,https://x/3.mp4,PT00H00M10S,000051_000100,never downloaded\n"
             + "14781349,https://x/4.mp4,PT00H00M30S,000051_000100,Snow falls\n")
  b = build("webvid", tmp_path / "data", root)
  train = records(b, "train")
  assert [(r["video_id"], r["caption"]) for r in train] == [
      (b"31353427", b"Aerial, shot of a lake"), (b"14781349", b"Snow falls")]
  assert_video(train[1], 1)
  assert set(b.info.splits) == {"train"}  # no val csv
  r = b.skipped()["train"]
  assert (r["total"], r["kept"], r["missing"], r["unreadable"]) == (4, 2, 1, 1)


def test_cc3m_images_by_row_index(tmp_path):
  root = tmp_path / "manual"
  write_text(root / "Train_GCC-training.tsv", "".join(
      f"caption number {i}\thttp://example.com/{i}.jpg\n" for i in range(5)))
  colours = {0: (200, 0, 0), 2: (0, 200, 0), 4: (0, 0, 200)}
  paths = {0: "00000/000000000.jpg", 2: "00000/000000002.jpg", 4: "000000004.png"}
  for i, rel in paths.items():
    os.makedirs(os.path.dirname(root / "train" / rel), exist_ok=True)
    Image.new("RGB", (40, 30), colours[i]).save(root / "train" / rel)
  write_corrupt(root / "train" / "00000" / "000000003.jpg")
  b = build("cc3m", tmp_path / "data", root, num_frames=1)
  train = records(b, "train")
  assert [r["video_id"] for r in train] == [b"0", b"2", b"4"]
  assert [r["caption"] for r in train] == [b"caption number 0", b"caption number 2", b"caption number 4"]
  for rec, i in zip(train, (0, 2, 4)):
    (img,) = [video_io.decode_jpeg(j) for j in rec["frames"]]
    assert img.shape == (SIZE, 21, 3)  # 40x30 -> short side 16
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), colours[i], atol=8)
  r = b.skipped()["train"]
  assert (r["missing"], r["unreadable"]) == (1, 1)


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


def _didemo_fixture(root, n=4):
  for v in range(n):
    write_video(root / "videos" / f"vid{v}.mp4", v)
  for split in ("train", "val", "test"):
    write_json(root / f"{split}_data.json", [{"video": f"vid{v}.mp4", "description": f"d{v}",
                                              "times": [[0, 1]]} for v in range(n)])


def test_interrupted_build_is_not_prepared_and_rebuilds(tmp_path, monkeypatch):
  root, data = tmp_path / "manual", tmp_path / "data"
  _didemo_fixture(root)
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
  _didemo_fixture(root, n=2)
  early = real.get_builder("didemo", tmp_path / "data", num_frames=T, image_size=SIZE, workers=0)
  build("didemo", tmp_path / "data", root)
  for path in root.rglob("*.mp4"):
    path.unlink()  # once built, the downloaded files are not read again
  early.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert [r["caption"] for r in records(early, "test")] == [b"d0", b"d1"]


def test_worker_processes_store_the_same_records(tmp_path):
  root = tmp_path / "manual"
  _didemo_fixture(root, n=3)
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
  assert set(real.REAL_DATASETS) == {"msrvtt", "msvd", "didemo", "activitynet", "webvid", "cc3m"}
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
  _didemo_fixture(pathlib.Path(root), n=2)
  cfg = pipeline.default_data_config()
  cfg.update({"name": "didemo", "data_dir": str(tmp_path), "builder_config": "default"})
  source = pipeline.get_source(cfg, "val")
  assert len(source) == 2 and source[1]["caption"] == b"d1"
  frames = [video_io.decode_jpeg(j) for j in source[1]["frames"]]
  assert len(frames) == 8 and frames[0].shape == (224, 336, 3)  # registered config: 8 frames, 224
