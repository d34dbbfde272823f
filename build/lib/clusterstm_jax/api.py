"""A trained model from Python: `clusterstm_jax.load(DIR)`.

  import clusterstm_jax
  model = clusterstm_jax.load('exports/pretrain')     # an export or a training run
  v = model.embed_video(['a.mp4', 'b.mp4'])           # or uint8 [T,H,W,3] / [B,T,H,W,3] frames
  t = model.embed_text(['a red circle moves left'])
  scores = model.similarity(t, v)                     # [texts, videos]

It runs the task's own prediction functions (tasks.Task.predict_fns), jitted as the evaluators
jit them (evaluators.Context), so a score here is the score the retrieval evaluator ranks by:
the per-frame cosine similarity averaged over frames. A VideoQA fine-tune also answers
(`answer`), a captioning fine-tune also captions (`caption`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from clusterstm_jax import evaluators
from clusterstm_jax import loading
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import tasks as tasks_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.data import video_io
from clusterstm_jax.errors import UserError
from clusterstm_jax.evaluators import captioning
from clusterstm_jax.evaluators import qa as qa_eval


def load(path: str, *, data_dir: str = '', batch_size: int = 8) -> 'Model':
  """An export (python -m clusterstm_jax.export) or a training run -> a `Model`.

  batch_size: rows per call of the jitted functions (inputs are padded to it, so one compile
  serves every call); rounded up to a multiple of the data-parallel devices.
  """
  config, params, tokenizer, mesh = loading.load_model(os.fspath(path), data_dir)
  return Model(config, params, tokenizer, mesh, batch_size=batch_size)


class Model:
  """A loaded model; every method takes host inputs and returns numpy arrays or strings."""

  def __init__(self, config, params, tokenizer, mesh, *, batch_size: int = 8):
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.task = tasks_lib.get(config, tasks_lib.TextSpec.from_tokenizer(tokenizer))
    self._ctx = evaluators.Context(config=config, params=params,
                                   predict_fns=self.task.predict_fns, decode=self.task.decode,
                                   tokenizer=tokenizer, mesh=mesh)
    shards = sharding_lib.batch_size_per_shard(mesh)
    self.batch_size = -(-max(1, batch_size) // shards) * shards
    self._jitted = {}

  @property
  def num_frames(self) -> int:
    return self.config.data.num_frames

  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  # --------------------------------------------------------------------------- inputs
  def videos(self, videos) -> np.ndarray:
    """uint8 [B, T, S, S, 3] model input from video paths (decoded with PyAV), one clip's
    frames [T', H, W, 3] or a batch [B, T', H, W, 3] (uint8). Frames are sampled, centre-cropped
    and resized as the eval loader does (config.data.num_frames, config.data.image_size)."""
    if isinstance(videos, (str, os.PathLike)):
      videos = [videos]
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
      videos = videos[None]
    out = []
    for v in videos:
      if isinstance(v, (str, os.PathLike)):
        v = video_io.read_video_frames(v, self.num_frames)
      out.append(pipeline.eval_frames(np.asarray(v), self.num_frames, self.image_size))
    if not out:
      raise UserError('no videos given')
    return np.stack(out)

  def text_ids(self, texts: Sequence[str], max_len: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    return self.tokenizer.encode_batch(list(texts), max_len or self.config.data.max_text_len)

  # --------------------------------------------------------------------------- retrieval
  def embed_video(self, videos) -> np.ndarray:
    """float32 [B, E]: the per-frame unit-norm features averaged over frames (so that
    `embed_text(...) @ embed_video(...).T` is the retrieval evaluator's contrastive score)."""
    frames = self._map('embed_video', self.videos(videos))
    return frames.mean(axis=1)

  def embed_text(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [B, E], unit norm."""
    return self._map('embed_text', self.text_ids(texts))

  def similarity(self, texts, videos) -> np.ndarray:
    """[num_texts, num_videos] contrastive scores. Each argument: embeddings (a float array
    from embed_text / embed_video) or what those take (strings; paths or uint8 frames)."""
    t = texts if _is_embedding(texts) else self.embed_text(texts)
    v = videos if _is_embedding(videos) else self.embed_video(videos)
    return np.asarray(t, np.float32) @ np.asarray(v, np.float32).T

  # --------------------------------------------------------------------------- QA, captions
  def answer(self, videos, questions: Sequence[str], answers: Sequence[str] | None = None,
             k: int | None = None) -> list[str]:
    """One answer per (video, question) pair, chosen from `answers` (default: the dataset's
    answer list) as the VideoQA evaluator chooses: top-k by first token, then by likelihood
    (k default: every answer). Needs a VideoQA fine-tune (task 'qa')."""
    self._needs('qa_context', 'answer()', 'qa')
    video = self.videos(videos)
    questions = [questions] if isinstance(questions, str) else list(questions)
    if len(questions) != len(video):
      raise UserError(f'answer() takes one question per video: {len(questions)} questions, '
                      f'{len(video)} videos')
    answers = tuple(answers) if answers is not None else qa_data.answer_list(self.config.data)
    qa = self.config.qa
    table = self.tokenizer.encode_batch(list(answers), qa.answer_len)
    key = ('answer', answers, k)
    if key not in self._jitted:
      tok, fns = self.tokenizer, self.task.predict_fns
      top = min(k or len(answers), len(answers))

      def predict(params, video, ids):
        context, mask = fns['qa_context'](params, video, ids[:, None])
        decoder = lambda i, c, m: fns['decode'](params, i, c, m)
        return qa_eval.predict_answers(decoder, context, mask, table, k=top,
                                       bos_id=tok.cls_id, pad_id=tok.pad_id)
      self._jitted[key] = self._ctx.jit(predict)
    ids = self.text_ids(questions, qa.question_len)
    idx = self._batched(self._jitted[key], video, ids)
    return [answers[i] for i in idx.tolist()]

  def caption(self, videos, beam_size: int = 1, alpha: float = 0.0) -> list[str]:
    """One caption per video (greedy, or beam search with GNMT length penalty alpha), as the
    captioning evaluator decodes. Needs a captioning fine-tune (task 'caption')."""
    self._needs('caption_context', 'caption()', 'caption')
    key = ('caption', beam_size, alpha)
    if key not in self._jitted:
      tok, fns, max_len = self.tokenizer, self.task.predict_fns, self.config.data.max_text_len

      def generate(params, video):
        context = fns['caption_context'](params, video)
        decoder = lambda i, c, m: fns['decode'](params, i, c, m)
        return captioning.decode_captions(
            decoder, context, None, max_len=max_len, bos_id=tok.cls_id, eos_id=tok.eos_id,
            pad_id=tok.pad_id, beam_size=beam_size, alpha=alpha)[0]
      self._jitted[key] = self._ctx.jit(generate)
    ids = self._batched(self._jitted[key], self.videos(videos))
    return [self.tokenizer.decode(row) for row in ids]

  # --------------------------------------------------------------------------- batching
  def _needs(self, fn: str, what: str, task: str) -> None:
    if fn not in self.task.predict_fns:
      raise UserError(f'{what} needs a fine-tune of task {task!r}; this model is '
                      f'{self.config.task!r}')

  def _map(self, name: str, x: np.ndarray) -> np.ndarray:
    if name not in self._jitted:
      self._jitted[name] = self._ctx.jit(self.task.predict_fns[name])
    return self._batched(self._jitted[name], x)

  def _batched(self, fn, *arrays: np.ndarray) -> np.ndarray:
    """fn(params, *batch) over fixed-size batches (the last one padded), rows concatenated."""
    n, size, out = len(arrays[0]), self.batch_size, []
    for start in range(0, n, size):
      chunk = [a[start:start + size] for a in arrays]
      rows = len(chunk[0])
      chunk = [np.concatenate([c, np.repeat(c[-1:], size - rows, 0)]) for c in chunk]
      batch = sharding_lib.global_batch(dict(enumerate(chunk)), self.mesh)
      out.append(np.asarray(fn(self.params, *(batch[i] for i in range(len(chunk)))))[:rows])
    return np.concatenate(out)


def _is_embedding(x) -> bool:
  return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and x.ndim == 2
