"""The frozen SigLIP teacher: where its weights come from, and its per-frame token features.

`config.teacher` says where the weights are:
  export   an exported teacher (python -m clusterstm_jax.export), or
  workdir  a teacher training run; when it has no checkpoint yet it is trained first with
           `config.teacher.config` (configs/teacher.py on shapes), then exported and reused.
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
from absl import logging

from clusterstm_jax import export as export_lib
from clusterstm_jax.errors import UserError


@dataclasses.dataclass
class Teacher:
  model: nn.Module          # models.siglip.SigLIP
  params: Any               # sharded, frozen
  param_shardings: Any

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

    Equal to map_pool over relevance_windows(tokens, grid_hw, k) (tests/test_models.py), but
    each token's key and value are projected once, not once per window it sits in."""
    b, t, n, d = tokens.shape
    grid = tokens.reshape(b * t, *grid_hw, d)
    pooled = self.model.apply({'params': params}, grid, k, method=self.model.map_pool_windows)
    return pooled.reshape(b, t, n, pooled.shape[-1])



def model_from_config(config, vocab_size: int | None = None):
  """The teacher module described by `config.teacher.model` (external weights, compile checks)."""
  from clusterstm_jax.models import siglip
  m = config.teacher.model
  return siglip.SigLIP(variant=m.vision_variant, text_variant=m.text_variant,
                       image_size=config.data.image_size,
                       vocab_size=vocab_size or m.vocab_size, text_len=m.text_len,
                       out_dim=m.get('out_dim'))


def _layout(model, config, mesh):
  from clusterstm_jax import sharding as sharding_lib
  from clusterstm_jax import step as step_lib
  s = config.data.image_size
  inputs = (jnp.zeros((2, s, s, 3), jnp.float32), jnp.zeros((2, model.text_len), jnp.int32))
  boxed = step_lib.abstract_params(model, inputs)
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


def ensure_teacher_export(config) -> str:
  """Path of an exported teacher; trains and exports one first when it does not exist yet."""
  tc = config.teacher
  if tc.export:
    if not os.path.exists(os.path.join(tc.export, 'config.json')):
      raise UserError(f'teacher export not found: {tc.export} (config.teacher.export)')
    return tc.export
  export_dir = os.path.join(tc.workdir, 'export')
  if os.path.exists(os.path.join(export_dir, 'config.json')):
    return export_dir
  from clusterstm_jax import config_lib
  from clusterstm_jax import train
  teacher_config = config_lib.load_config_file(tc.config)
  with teacher_config.unlocked():
    teacher_config.data = config.data.copy_and_resolve_references()
  logging.info('no teacher at %s: training one with %s', tc.workdir, tc.config)
  print(f'Training the teacher first ({tc.config} -> {tc.workdir}); it is reused afterwards.')
  train.train_and_evaluate(teacher_config, tc.workdir)
  return export_lib.export_run(tc.workdir, export_dir)


def load_teacher(config, mesh) -> Teacher:
  from clusterstm_jax import step as step_lib
  if config.teacher.get('init'):
    return _load_external(config, mesh)
  export_dir = ensure_teacher_export(config)
  tconfig = export_lib.read_config(export_dir)
  if tconfig.data.image_size != config.data.image_size:
    raise UserError(f'teacher image_size {tconfig.data.image_size} != data.image_size '
                    f'{config.data.image_size}')
  model = step_lib.make_siglip(tconfig, _vocab_size(export_dir))
  abstract, shardings = _layout(model, config, mesh)
  params = export_lib.read_params(export_dir, abstract)
  width = jax.tree.leaves(params['img']['Transformer']['encoder_norm'])[0].shape[-1]
  decoder = config.model.get('decoder')
  if decoder is not None and decoder.out_dim and decoder.out_dim != width:
    raise UserError(f'model.decoder.out_dim={decoder.out_dim} must equal the teacher width '
                    f'{width}')
  return Teacher(model=model, params=params, param_shardings=shardings)


def _load_external(config, mesh) -> Teacher:
  """A pretrained SigLIP (big_vision .npz or HF safetensors) described by config.teacher.model."""
  from clusterstm_jax.models import siglip
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


def _vocab_size(export_dir: str) -> int:
  from clusterstm_jax.data.tokenizer import Tokenizer
  return Tokenizer(export_lib.tokenizer_path(export_dir)).vocab_size


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
