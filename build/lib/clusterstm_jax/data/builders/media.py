"""Media decoding for the real-dataset builders: videos and images -> lists of JPEG bytes.

Owns how a build turns one media file into the stored frames: `num_frames` frames at the middles
of equal time segments (the same rule as video_io.sample_frame_indices with rng=None), resized so
the short side is `short_side` (aspect ratio kept), each encoded as one JPEG. Long videos are not
decoded end to end: the reader seeks ahead when the next wanted frame is far away.

This module imports neither TFDS nor JAX, so decode worker processes start quickly.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from clusterstm_jax.data import video_io

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp",
                    ".flv", ".wmv", ".ogv")
MISSING = "missing"  # load_media's reason for a file that does not exist


class MediaTask(NamedTuple):
  """What a worker needs to decode one media file (picklable)."""
  path: str
  is_image: bool
  num_frames: int
  short_side: int
  jpeg_quality: int


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(H, W) with the short side equal to `short_side` and the aspect ratio kept."""
  if height <= width:
    return short_side, max(1, round(width * short_side / height))
  return max(1, round(height * short_side / width)), short_side


def load_media(task: MediaTask) -> tuple[list[bytes] | None, str | None]:
  """(jpegs, None) on success; (None, MISSING) or (None, one-line reason) when unusable.

  Any ordinary exception (a corrupt container, a truncated stream, an image PIL cannot read) is
  caught: the caller counts the file as skipped. KeyboardInterrupt and the like propagate.
  """
  if not task.path or not os.path.isfile(task.path):
    return None, MISSING
  try:
    if task.is_image:
      frames = read_image(task.path, task.short_side)[None]
    else:
      frames = read_video(task.path, task.num_frames, task.short_side)
    return [video_io.encode_jpeg(f, task.jpeg_quality) for f in frames], None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def read_image(path: str | os.PathLike, short_side: int) -> np.ndarray:
  """uint8 [H, W, 3] with the short side resized to `short_side`."""
  with Image.open(path) as im:
    h, w = resized_shape(im.height, im.width, short_side)
    im.draft("RGB", (w, h))  # JPEG: decode at a reduced scale that is still >= the target
    im = im.convert("RGB")
    if im.size != (w, h):
      im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im)


def read_video(path: str | os.PathLike, num_frames: int, short_side: int,
               seek_gap_s: float = 3.0) -> np.ndarray:
  """uint8 [num_frames, H, W, 3]: the frames shown at the middles of num_frames equal segments.

  Uses the stream's timestamps; when the container gives no duration or timestamps, or seeking
  fails, falls back to counting the frames and picking by index (two sequential decodes).
  """
  import av  # imported here: only video builds need it

  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  path = os.fspath(path)
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    times = _segment_times(container, stream, num_frames)
    if times is not None:
      try:
        frames = _frames_at_times(container, stream, times, seek_gap_s)
        return np.stack([_to_rgb(f, short_side) for f in frames])
      except (av.error.FFmpegError, _NoTimestamps, ValueError):
        pass  # fall back to decoding by index below
  return _read_by_index(path, num_frames, short_side)


class _NoTimestamps(Exception):
  pass


def _segment_times(container, stream, num_frames: int) -> list[float] | None:
  tb = stream.time_base
  if stream.duration and tb:
    duration = float(stream.duration * tb)
  elif container.duration:
    duration = container.duration / 1_000_000  # av.time_base: microseconds
  else:
    return None
  if duration <= 0:
    return None
  start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
  return [start + (i + 0.5) * duration / num_frames for i in range(num_frames)]


def _frames_at_times(container, stream, times: list[float], seek_gap_s: float) -> list:
  """For each time (ascending), the last frame whose timestamp is <= it (or the first after it).

  Decodes forward and keeps one frame of look-ahead; seeks (to the keyframe before the target)
  only when the target is more than seek_gap_s past the decoding position.
  """
  eps = 1e-6
  frames = container.decode(stream)
  last = pending = None  # last: newest frame at or before the target; pending: one look-ahead
  out = []
  for t in times:
    newest = pending if pending is not None else last
    if newest is not None and t - newest.time > seek_gap_s:
      container.seek(int(t / stream.time_base), stream=stream, backward=True)
      frames, last, pending = container.decode(stream), None, None
    while True:
      frame = pending if pending is not None else next(frames, None)
      pending = None
      if frame is None:  # end of stream: keep the newest decoded frame
        break
      if frame.time is None:
        raise _NoTimestamps()
      if frame.time > t + eps and last is not None:
        pending = frame
        break
      last = frame
      if frame.time > t + eps:  # the first frame is already past t (e.g. a late first pts)
        break
    if last is None:
      raise ValueError("no frame could be decoded")
    out.append(last)
  return out


def _read_by_index(path: str, num_frames: int, short_side: int) -> np.ndarray:
  import av

  with av.open(path) as container:
    total = sum(1 for _ in container.decode(video=0))
  if total == 0:
    raise ValueError("no frame could be decoded")
  idx = video_io.sample_frame_indices(total, num_frames).tolist()
  wanted, picked = set(idx), {}
  with av.open(path) as container:
    for i, frame in enumerate(container.decode(video=0)):
      if i in wanted:
        picked[i] = _to_rgb(frame, short_side)
      if i >= idx[-1]:
        break
  return np.stack([picked[i] for i in idx])


def _to_rgb(frame, short_side: int) -> np.ndarray:
  h, w = resized_shape(frame.height, frame.width, short_side)
  return frame.to_ndarray(format="rgb24", width=w, height=h)
