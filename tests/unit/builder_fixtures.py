"""Fixtures of tests/unit/test_builders_*.py: tiny real-dataset downloads in each dataset's
published layout, and builds of them.

Every fixture video is written with PyAV and encodes what it is: frame i of video v has red
level video_r(v) and green level frame_g(i), so a test can tell from the stored JPEGs which
video and which frames a record holds.
"""
import json
import os

import av
import numpy as np
import tensorflow_datasets as tfds

from clusterstm_jax.data import video_io
from clusterstm_jax.data.builders import real

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


def didemo_fixture(root, n=4):
  """A DiDeMo manual dir of n videos, each in all three splits."""
  for v in range(n):
    write_video(root / "videos" / f"vid{v}.mp4", v)
  for split in ("train", "val", "test"):
    write_json(root / f"{split}_data.json", [{"video": f"vid{v}.mp4", "description": f"d{v}",
                                              "times": [[0, 1]]} for v in range(n)])
