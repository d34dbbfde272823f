"""The frozen SigLIP teacher: where its weights come from, and its per-frame token features.

`config.teacher` says where the weights are:
  init     external SigLIP weights (big_vision .npz or Hugging Face safetensors), or
  export   an exported teacher (python -m clusterstm_jax.export), or
  workdir  a teacher training run, read from its export (WORKDIR/export).
This module only loads a teacher. Training a missing default teacher is a run of its own,
which `loop.prepare_teacher` (python -m clusterstm_jax.train) starts before the student's.
The teacher's params live outside the train state and the optimizer: they are an argument of the
jitted step, sharded by the same rules as the student, and never differentiated.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterstm_jax import exports
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax.data import teacher_cache
from clusterstm_jax.data.tokenizer import Tokenizer
from clusterstm_jax.data.tokenizer import open_tokenizer
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.models import common as models_common
from clusterstm_jax.models import siglip
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tasks import siglip as siglip_task


@dataclasses.dataclass
class Teacher:
  model: nn.Module          # models.siglip.SigLIP
  params: Any               # sharded, frozen
  param_shardings: Any
  # Its own tokenizer (load_tokenizer): the batch's `teacher_text` is encoded with it, at the
  # text tower's length. None for an abstract teacher (compiling needs no ids).
  tokenizer: Any = None

  @property
  def text_stream(self):
    """(tokenizer, text length) for pipeline.make_train_loader(teacher_text=...)."""
    if self.tokenizer is None:
      raise ValueError('this teacher has no tokenizer (an abstract teacher?)')
    return self.tokenizer, self.model.text_len

  def frame_tokens(self, params, video):
    """video [B,T,H,W,3] in [-1,1] -> teacher tokens [B,T,N,D] (encoder_norm output)."""
    b, t = video.shape[:2]
    _, aux = self.model.apply({'params': params}, video.reshape(b * t, *video.shape[2:]),
                              method=self.model.encode_image)
    tokens = aux['tokens']
    return tokens.reshape(b, t, *tokens.shape[1:])

  def text_embedding(self, params, ids):
    return self.model.apply({'params': params}, ids, method=self.model.encode_text)

  def relevance_tokens(self, params, tokens, grid_hw, k: int = 3):
    """Every token pooled with its k x k neighbours by the teacher's MAP head: [B,T,N,D].

    Equal to map_pool over relevance_windows(tokens, grid_hw, k) (tests/unit/
    test_models_siglip.py), but each token's key and value are projected once, not once per
    window it sits in."""
    b, t, n, d = tokens.shape
    grid = tokens.reshape(b * t, *grid_hw, d)
    pooled = self.model.apply({'params': params}, grid, k, method=self.model.map_pool_windows)
    return pooled.reshape(b, t, n, pooled.shape[-1])



def with_policy(model, config):
  """The frozen teacher runs in the student run's compute dtype (config.dtype); its outputs
  are float32 (models/siglip.py). No remat: nothing of a frozen forward is kept for backward."""
  return model.clone(dtype=models_common.policy(config)['dtype'])


def model_from_config(config, vocab_size: int | None = None):
  """The teacher module described by `config.teacher.model` (external weights, compile checks)."""
  m = config.teacher.model
  return with_policy(siglip.SigLIP(variant=m.vision_variant, text_variant=m.text_variant,
                                   image_size=config.data.image_size,
                                   vocab_size=vocab_size or m.vocab_size, text_len=m.text_len,
                                   out_dim=m.get('out_dim')), config)


def _layout(model, config, mesh):
  s = config.data.image_size
  inputs = (jnp.zeros((2, s, s, 3), jnp.float32), jnp.zeros((2, model.text_len), jnp.int32))
  boxed = tasks_base.abstract_params(model, inputs)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def abstract_teacher(config, mesh) -> Teacher:
  """A teacher with abstract (ShapeDtypeStruct) params: enough to lower and compile the step."""
  model = model_from_config(config)
  abstract, shardings = _layout(model, config, mesh)
  return Teacher(model=model, params=abstract, param_shardings=shardings)


def export_dir(config) -> str:
  """Where the teacher export of `config` is (exported or not yet): config.teacher.export, or
  the export of the teacher run in config.teacher.workdir."""
  tc = config.teacher
  return tc.export or os.path.join(tc.workdir, 'export')


def source(config) -> str:
  """The teacher's weights as a path (external weights, else its export): what an offline
  teacher cache records it was made with."""
  return config.teacher.get('init') or export_dir(config)


def cache_fingerprint(config) -> dict:
  """The fingerprint (data/teacher_cache.py) of a teacher cache made with, or for, `config`."""
  _, h, w = tasks_base.grid(config)
  return teacher_cache.fingerprint(config, source(config),
                                   masking.num_keep(h * w, config.mask.ratio),
                                   tasks_base.patch_size(config))


def has_export(config) -> bool:
  return os.path.exists(os.path.join(export_dir(config), 'config.json'))


def tokenizer_path(config) -> str:
  """The teacher's own tokenizer: config.teacher.tokenizer.model, else its export's (an export
  carries the tokenizer its text tower was trained with). External weights need it given."""
  tc = config.teacher
  path = tc.get('tokenizer', {}).get('model', '')
  if path:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise UserError(f'teacher tokenizer not found: {path} (config.teacher.tokenizer.model)')
    return path
  if tc.get('init'):
    raise UserError('config.teacher.init needs the teacher\'s own tokenizer: set '
                    'config.teacher.tokenizer.model (e.g. SigLIP\'s spiece.model; '
                    'docs/pretrained_weights.md)')
  return exports.tokenizer_path(export_dir(config))


def load_tokenizer(config) -> Tokenizer:
  """The teacher's tokenizer with the conventions of config.teacher.tokenizer (ours: [CLS] first,
  pad 0; a public SigLIP's: bos=False, pad='eos', canonicalize=True)."""
  conv = config.teacher.get('tokenizer')
  kwargs = {} if conv is None else dict(bos=conv.bos, pad=conv.pad, canonicalize=conv.canonicalize)
  return open_tokenizer(tokenizer_path(config), **kwargs)


def load_teacher(config, mesh) -> Teacher:
  """The frozen teacher of config.teacher (external weights, or an export) with its tokenizer."""
  teacher = _load_weights(config, mesh)
  teacher.tokenizer = load_tokenizer(config)
  if teacher.tokenizer.vocab_size > teacher.model.vocab_size:
    raise UserError(f'the teacher tokenizer {teacher.tokenizer.model_path} has '
                    f'{teacher.tokenizer.vocab_size} pieces but its text tower embeds '
                    f'{teacher.model.vocab_size}')
  return teacher


def _load_weights(config, mesh) -> Teacher:
  if config.teacher.get('init'):
    return _load_external(config, mesh)
  path = export_dir(config)
  if not has_export(config):
    where = ('config.teacher.export' if config.teacher.export else
             f'config.teacher.workdir; train it with --config={config.teacher.config}')
    raise UserError(f'teacher export not found: {path} ({where})')
  tconfig = exports.read_config(path)
  if tconfig.data.image_size != config.data.image_size:
    raise UserError(f'teacher image_size {tconfig.data.image_size} != data.image_size '
                    f'{config.data.image_size}')
  model = with_policy(siglip_task.make_model(tconfig, _vocab_size(path)), config)
  abstract, shardings = _layout(model, config, mesh)
  params = exports.read_params(path, abstract)
  width = jax.tree.leaves(params['img']['Transformer']['encoder_norm'])[0].shape[-1]
  decoder = config.model.get('decoder')
  if decoder is not None and decoder.out_dim and decoder.out_dim != width:
    raise UserError(f'model.decoder.out_dim={decoder.out_dim} must equal the teacher width '
                    f'{width}')
  return Teacher(model=model, params=params, param_shardings=shardings)


def _load_external(config, mesh) -> Teacher:
  """A pretrained SigLIP (big_vision .npz or HF safetensors) described by config.teacher.model."""
  path = os.path.expanduser(config.teacher.init)
  if not os.path.exists(path):
    raise UserError(f'teacher checkpoint does not exist: {path} (config.teacher.init)')
  model = model_from_config(config)
  abstract, shardings = _layout(model, config, mesh)
  try:
    params = siglip.load(path, abstract, model=model)
  except ValueError as e:  # checkpoint_io.CheckpointError: names the parameter or the file
    raise UserError(f'teacher checkpoint {path}: {e}') from e
  params = jax.device_put(nn.unbox(params), shardings)
  return Teacher(model=model, params=params, param_shardings=shardings)


def _vocab_size(path: str) -> int:
  return open_tokenizer(exports.tokenizer_path(path)).vocab_size


def relevance_windows(tokens, grid_hw: tuple[int, int], k: int = 3):
  """Every token with its k x k spatial neighbours: [B,T,N,D] -> [B*T*N, k*k, D] + mask.

  Out-of-frame neighbours are masked (clipped at borders), so the MAP head pools only real tokens.
  """
  b, t, n, d = tokens.shape
  h, w = grid_hw
  r = k // 2
  x = tokens.reshape(b * t, h, w, d)
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  valid = jnp.pad(jnp.ones((h, w), bool), ((r, r), (r, r)))
  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  offs = [(dy, dx) for dy in range(k) for dx in range(k)]
  win = jnp.stack([x[:, rows + dy, cols + dx] for dy, dx in offs], axis=3)  # [BT,h,w,k*k,D]
  msk = jnp.stack([valid[rows + dy, cols + dx] for dy, dx in offs], axis=2)  # [h,w,k*k]
  win = win.reshape(b * t * n, k * k, d)
  msk = jnp.broadcast_to(msk.reshape(1, n, k * k), (b * t, n, k * k)).reshape(b * t * n, k * k)
  return win, msk
