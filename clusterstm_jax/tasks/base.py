"""What every task shares: the `Task` interface the trainer and evaluators use, the tokenizer
facts the losses need (`TextSpec`), the batch layout of the pipeline and the on-device video
normalisation."""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterstm_jax.data import pipeline
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.models import common as common_lib


def normalize_video(video):
  """uint8 [..., 3] -> float32 in [-1, 1] (done on device: the host ships bytes, not floats)."""
  return video.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def patch_size(config) -> int:
  return common_lib.parse_variant(config.model.vision_variant)[1]


def grid(config) -> tuple[int, int, int]:
  """(T, h, w) token grid of the student (and teacher: both use the same patch grid)."""
  n = config.data.image_size // patch_size(config)
  return config.data.num_frames, n, n


def abstract_params(model, inputs):
  """Boxed (logically partitioned) abstract params: shapes first, no allocation."""
  return jax.eval_shape(
      lambda r: model.init({'params': r, 'dropout': r}, *inputs)['params'], jax.random.key(0))


def video_batch(config, batch_size: int, *, image: bool = False,
                teacher_text_len: int = 0) -> dict[str, np.ndarray]:
  """A batch of the pipeline's shapes and dtypes (init and compilation); `image`: a batch of
  the image stream (T = 1); `teacher_text_len` > 0: with the teacher's ids (`teacher_text`)."""
  t, s, l = config.data.num_frames, config.data.image_size, config.data.max_text_len
  t = 1 if image else t
  batch = dict(video=np.zeros((batch_size, t, s, s, 3), np.uint8),
               text=np.zeros((batch_size, l), np.int32),
               labels=np.zeros((batch_size, t, s, s), np.uint8),
               index=np.arange(batch_size, dtype=np.int32))  # distinct videos
  if teacher_text_len:
    batch['teacher_text'] = np.zeros((batch_size, teacher_text_len), np.int32)
  if 'teacher' in config and config.teacher.get('cache') and not image:
    # The offline teacher cache's fields (data/teacher_cache.py): mask and MRM target.
    _, h, w = grid(config)
    nc = masking.num_keep(h * w, config.mask.ratio)
    batch.update(keep_idx=np.tile(np.arange(nc, dtype=np.int32), (batch_size, t, 1)),
                 mrm_target=np.zeros((batch_size, t, h * w), np.float32),
                 text_emb=np.ones((batch_size, config.model.decoder.out_dim), np.float32))
  return batch


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The tokenizer facts the losses need (MLM masking); no tokenizer object inside jit."""
  vocab_size: int
  pad_id: int = 0
  cls_id: int = 2
  eos_id: int = 3
  mask_id: int = 4

  @classmethod
  def from_tokenizer(cls, tok) -> 'TextSpec':
    return cls(tok.vocab_size, tok.pad_id, tok.cls_id, tok.eos_id, tok.mask_id)


@dataclasses.dataclass
class Task:
  """One objective: its model, loss and batches, and what its evaluators may call.

  The trainer knows a task only through this interface; `tasks.get(config)` builds one.
  """
  name: str
  model: nn.Module
  init_inputs: tuple
  loss_fn: Callable       # (params, batch, rng, teacher_params) -> (loss, metrics)
  encode_video: Callable  # (params, video uint8 [B,T,H,W,3]) -> normalised [B,T,E]
  encode_text: Callable   # (params, ids [B,L]) -> normalised [B,E]
  # The same objective on every token (no masking, no MRM, no teacher): FLIP's "unmasked
  # tuning", run for the last `config.unmasked_steps` steps. None where a task has no masking.
  unmasked_loss_fn: Callable | None = None
  # (batch_size, image=False) -> a batch of the loader's shapes and dtypes (init, lowering).
  dummy_batch: Callable[..., dict[str, np.ndarray]] | None = None
  # The loader's per-example decode (pipeline.make_*_loader(decode=)).
  decode: Callable = pipeline.decode_example
  # Pure functions of (params, arrays) the evaluators call (big_vision's predict_fns), by name:
  # 'encode', 'match' (retrieval), 'answer' (VideoQA), 'caption' (captioning).
  predict_fns: dict[str, Callable] = dataclasses.field(default_factory=dict)
  # params -> params after every optimizer update (a projection onto the parameters' allowed
  # set, e.g. UMT's in-place clamp of the temperature); None: no constraint.
  project_params: Callable | None = None
  # Whether an image stream (T = 1 batches, config.images) can train this task.
  takes_images: bool = False
  # The loss of the image stream's steps when it differs from loss_fn (e.g. another mask ratio).
  image_loss_fn: Callable | None = None
