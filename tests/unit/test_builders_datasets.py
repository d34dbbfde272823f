"""Real-dataset TFDS builders, built from tiny fixtures in each dataset's published layout
(tests/unit/builder_fixtures.py): MSR-VTT, MSVD, the paragraph datasets (DiDeMo, ActivityNet
Captions), the pretraining corpora (WebVid, CC3M)."""
import os

import numpy as np
import pytest
from PIL import Image

from clusterstm_jax.data import video_io
from clusterstm_jax.data.builders import common, webvid
from clusterstm_jax.errors import UserError
from tests.unit.builder_fixtures import (SIZE, assert_video, build, records, texts, write_corrupt,
                                         write_json, write_text, write_video)

pytestmark = pytest.mark.unit


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


def test_webvid_csv_paths_stay_inside_the_videos_dir(tmp_path):
  header = "videoid,contentUrl,duration,page_dir,name\n"
  for page_dir, vid in (("../../etc", "1"), ("/abs", "1"), ("000001_000050", "../x"), ("", "1")):
    path = tmp_path / "r.csv"
    write_text(path, header + f"{vid},u,PT00H00M10S,{page_dir},caption\n")
    with pytest.raises(UserError, match="r.csv line 2: .*not a plain relative name"):
      list(webvid._rows(str(path), str(tmp_path / "videos")))


def test_symlink_cycles_are_walked_once(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / "v.mp4").write_bytes(b"")
  os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # a -> b -> loop -> a -> ...
  os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "alias")
  assert common.index_files(str(tmp_path)) == {"v": str(tmp_path / "a" / "alias" / "v.mp4")}
