"""Portable exports: one `model.safetensors` or `model.npz` that other code can read, beside
the tokenizer, with the run config inside. (python -m clusterstm_jax.export --format=...)

Names (docs/pretrained_weights.md#portable-exports):
  safetensors  the student's vision tower under Hugging Face SigLIP vision names
               (`vision_model.embeddings.patch_embedding.weight`, `vision_model.encoder.layers.
               {i}.self_attn.q_proj.weight`, ..., `vision_model.post_layernorm.weight`; torch
               layouts), with a transformers `config.json` (SiglipVisionConfig, no head) beside
               it, so `transformers.SiglipVisionModel.from_pretrained(DIR)` is that tower on
               images in [-1, 1];
  npz          the vision tower under big_vision ViT names (`params/img/embedding/kernel`,
               `params/img/Transformer/encoderblock_{i}/...`, `params/img/pos_embedding`);
  both         every other parameter under `clusterstm/` + its flax path ('/'-joined, flax
               layouts), e.g. `clusterstm/text_proj/kernel`, `clusterstm/vision/time_embedding`.
The vision tower gets the public names only where the architecture is SigLIP's (no class
token, no pre-encoder norm); a CLIP-style tower (our patch embedding has a bias, CLIP's has
none) stays under `clusterstm/vision/...`. With fixed sin-cos positions the exported position
table is the table of one frame (an image): T > 1 adds a time component only our model has.
The run config is JSON metadata: the safetensors header's `clusterstm_config`, the npz array
`__metadata__/clusterstm_config` (a string). Reading back goes through vit.load for the tower.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from clusterstm_jax.data import tokenizer as tokenizer_lib
from clusterstm_jax.errors import UserError
from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import common as common_lib
from clusterstm_jax.models import vit as vit_lib

FORMATS = ('orbax', 'safetensors', 'npz')
FILES = {'safetensors': 'model.safetensors', 'npz': 'model.npz'}
OURS = 'clusterstm/'
HF = 'vision_model.'
BV = 'params/img/'
CONFIG_KEY = 'clusterstm_config'
NPZ_CONFIG = '__metadata__/' + CONFIG_KEY


def find(export_dir: str) -> str | None:
  """The portable weight file of `export_dir`, or None when it is not a portable export."""
  for name in FILES.values():
    path = os.path.join(export_dir, name)
    if os.path.isfile(path):
      return path
  return None


def siglip_tower(config) -> bool:
  """Whether the student's vision tower has SigLIP's architecture (so public names apply)."""
  opts = config.model.get('vision_options') or {}
  return not opts.get('class_token', False) and not opts.get('pre_norm', False)


def public_names(config) -> bool:
  """Whether the vision tower is written under public names: SigLIP's architecture and
  activation (gelu tanh), LayerNorm eps 1e-6."""
  tower = _tower(config)
  return siglip_tower(config) and tower.mlp_act == 'gelu_tanh' and tower.ln_eps == 1e-6


def _tower(config) -> vit_lib.VideoViT:
  return clusterstm_lib.vision_tower(config.model, config.data.num_frames,
                                     config.data.image_size)


def _position_table(config, vision: dict) -> np.ndarray:
  """[N, D]: the learned spatial table, or the sin-cos table of one frame."""
  if 'pos_embedding' in vision:
    return np.asarray(vision['pos_embedding'])[0]
  tower = _tower(config)
  (gh, gw), d = tower.grid, tower.dims['width']
  return common_lib.sincos_posemb_3d(1, gh, gw, d)[0].astype(np.float32)


def _hf_vision(config, vision: dict) -> dict[str, np.ndarray]:
  """Our VideoViT params -> SigLIP vision names, torch layouts (inverse of vit._from_hf)."""
  out = {f'{HF}embeddings.patch_embedding.weight':
         np.transpose(vision['embedding']['kernel'], (3, 2, 0, 1)),
         f'{HF}embeddings.patch_embedding.bias': vision['embedding']['bias'],
         f'{HF}embeddings.position_embedding.weight': _position_table(config, vision)}
  blocks = vision['Transformer']
  for i in range(sum(k.startswith('encoderblock_') for k in blocks)):
    ours, hf = blocks[f'encoderblock_{i}'], f'{HF}encoder.layers.{i}.'
    for norm, name in (('LayerNorm_0', 'layer_norm1'), ('LayerNorm_1', 'layer_norm2')):
      out[f'{hf}{name}.weight'], out[f'{hf}{name}.bias'] = ours[norm]['scale'], ours[norm]['bias']
    att = ours['MultiHeadDotProductAttention_0']
    for part, name in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      kernel = att[part]['kernel']  # [D, H, hd]
      out[f'{hf}self_attn.{name}.weight'] = kernel.reshape(kernel.shape[0], -1).T
      out[f'{hf}self_attn.{name}.bias'] = att[part]['bias'].reshape(-1)
    kernel = att['out']['kernel']  # [H, hd, D]
    out[f'{hf}self_attn.out_proj.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
    out[f'{hf}self_attn.out_proj.bias'] = att['out']['bias']
    for dense, name in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[f'{hf}mlp.{name}.weight'] = ours['MlpBlock_0'][dense]['kernel'].T
      out[f'{hf}mlp.{name}.bias'] = ours['MlpBlock_0'][dense]['bias']
  norm = blocks['encoder_norm']
  out[f'{HF}post_layernorm.weight'], out[f'{HF}post_layernorm.bias'] = norm['scale'], norm['bias']
  return out


def _bv_vision(config, vision: dict) -> dict[str, np.ndarray]:
  """Our VideoViT params -> big_vision names (ours already are, under params/img/)."""
  flat = {k: v for k, v in cio.flatten(vision).items() if k != 'time_embedding'}
  flat['pos_embedding'] = _position_table(config, vision)[None]
  return {BV + k: v for k, v in flat.items()}


def hf_config(config, vision: dict) -> dict:
  """transformers SiglipVisionConfig fields of the student's vision tower (no pooling head)."""
  tower = _tower(config)
  dims = tower.dims
  block = vision['Transformer']['encoderblock_0']
  return dict(model_type='siglip_vision_model', architectures=['SiglipVisionModel'],
              hidden_size=dims['width'], intermediate_size=dims['mlp_dim'],
              num_hidden_layers=dims['depth'],
              num_attention_heads=int(block['MultiHeadDotProductAttention_0']['query']
                                      ['kernel'].shape[1]),
              num_channels=3, image_size=config.data.image_size, patch_size=dims['patch_size'],
              hidden_act='gelu_pytorch_tanh', layer_norm_eps=tower.ln_eps,
              vision_use_head=False)


def flat_arrays(params, config, fmt: str) -> dict[str, np.ndarray]:
  """The export's {name: array} (see the module docstring)."""
  params = dict(_numpy(params))
  out = {}
  vision = params.get('vision')
  if vision is not None and public_names(config):
    out.update(_hf_vision(config, vision) if fmt == 'safetensors' else _bv_vision(config, vision))
    rest = {'vision/time_embedding': vision['time_embedding']} if 'time_embedding' in vision else {}
    params = {k: v for k, v in params.items() if k != 'vision'}
  else:
    rest = {}
  rest.update(cio.flatten(params))
  out.update({OURS + k: np.ascontiguousarray(v) for k, v in rest.items()})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def write(out_dir: str, params, config, tokenizer_path: str, fmt: str) -> str:
  """Writes DIR/model.{safetensors,npz} (+ config.json for transformers, + tokenizer.model and,
  for a WordPiece vocabulary, its tokenizer_config.json)
  into DIR.tmp, then renames it to DIR (replacing an older export). Single-process: the params
  are gathered to this host."""
  if fmt not in FILES:
    raise UserError(f'--format={fmt!r} is not a portable format; known: {", ".join(FORMATS)}')
  if jax.process_count() > 1:
    raise UserError(f'--format={fmt} writes from one process: run the export on one machine '
                    '(it reads the run\'s checkpoint from there)')
  arrays = flat_arrays(params, config, fmt)
  out = os.path.abspath(out_dir)
  tmp = out + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  meta = json.dumps(config.to_dict())
  if fmt == 'safetensors':
    import safetensors.numpy  # lazy: only this format needs it
    safetensors.numpy.save_file(arrays, os.path.join(tmp, FILES[fmt]),
                                metadata={CONFIG_KEY: meta, 'format': 'clusterstm_jax'})
    if any(k.startswith(HF) for k in arrays):
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(hf_config(config, _numpy(params)['vision']), f, indent=1)
  else:
    np.savez(os.path.join(tmp, FILES[fmt]), **arrays, **{NPZ_CONFIG: np.asarray(meta)})
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, os.path.join(tmp, 'tokenizer.model'))
    for name, text in tokenizer_lib.export_files(tokenizer_path).items():
      with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
        f.write(text)
  shutil.rmtree(out, ignore_errors=True)
  os.rename(tmp, out)
  return out


def read_config(path: str) -> dict:
  """The run config (a dict) stored in a portable weight file."""
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as npz:
      if NPZ_CONFIG not in npz.files:
        raise UserError(f'{path} holds no {NPZ_CONFIG} (not a clusterstm_jax export)')
      return json.loads(str(npz[NPZ_CONFIG]))
  import safetensors  # lazy: only this format needs it
  with safetensors.safe_open(path, 'np') as f:
    meta = f.metadata() or {}
  if CONFIG_KEY not in meta:
    raise UserError(f'{path} has no {CONFIG_KEY} metadata (not a clusterstm_jax export)')
  return json.loads(meta[CONFIG_KEY])


def read_params(path: str, config, abstract_params) -> dict:
  """numpy params shaped like `abstract_params` (ShapeDtypeStructs): the vision tower through
  vit.load (our loader of public SigLIP / big_vision towers), the rest by name."""
  arrays = cio.read_npz(path) if path.endswith('.npz') else cio.read_safetensors(path)
  ours = {k[len(OURS):]: v for k, v in arrays.items() if k.startswith(OURS)}
  target = cio.flatten(abstract_params)
  tree = {}
  if 'vision' in abstract_params and any(k.startswith((HF, BV)) for k in arrays):
    template = {k: ours.get('vision/' + k, np.zeros(v.shape, v.dtype))
                for k, v in cio.flatten(abstract_params['vision']).items()}
    tree['vision'] = vit_lib.load(path, cio.unflatten(template), model=_tower(config))
    ours.pop('vision/time_embedding', None)
    target = {k: v for k, v in target.items() if not k.startswith('vision/')}
  missing = sorted(set(target) - set(ours))
  unused = sorted(set(ours) - set(target))
  if missing or unused:
    raise UserError(f'{path} does not fit this model: missing {missing[:5]}, unused '
                    f'{unused[:5]}')
  for k, v in target.items():
    if v.shape == () and ours[k].shape == (1,):  # safetensors.numpy stores scalars as [1]
      ours[k] = ours[k].reshape(())
    if tuple(ours[k].shape) != tuple(v.shape):
      raise UserError(f'{path}: {OURS}{k} has shape {ours[k].shape}, the model {v.shape}')
  tree.update(cio.unflatten({k: ours[k].astype(target[k].dtype) for k in target}))
  return tree
