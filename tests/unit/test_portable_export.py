"""Portable exports (portable.py): the smoke student written as safetensors / npz, read back
with our own loaders (vit.load for the vision tower) into identical parameters and outputs, and
the safetensors file loaded by transformers' SiglipVisionModel giving our tower's tokens.

The parameters are randomly perturbed first (LayerNorm scales != 1, biases != 0), so a swapped,
transposed or dropped array shows up.
"""
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from clusterstm_jax import portable
from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import vit
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tasks import pretrain
from tests import helpers

pytestmark = pytest.mark.unit
HAS_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
CLIP_LIKE = dict(posemb='learn', class_token=True, pre_norm=True, mlp_act='quick_gelu',
                 ln_eps=1e-5)
VARIANTS = {'sincos': None, 'learn': dict(posemb='learn'), 'clip_like': CLIP_LIKE}


def _student(options=None, seed=0):
  """(config, model, perturbed numpy params) of the smoke student."""
  config = helpers.smoke_config()
  if options:
    with config.unlocked():
      config.model.vision_options = options
  model = pretrain.make_model(config, helpers.SHAPES_VOCAB)
  t, s = config.data.num_frames, config.data.image_size
  abstract = nn.unbox(jax.eval_shape(
      lambda r: model.init({'params': r}, jnp.zeros((1, t, s, s, 3)),
                           jnp.zeros((1, config.data.max_text_len), jnp.int32))['params'],
      jax.random.key(0)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), abstract)
  return config, model, params, abstract


def _outputs(model, params, config):
  rng = np.random.default_rng(1)
  t, s = config.data.num_frames, config.data.image_size
  video = tasks_base.normalize_video(jnp.asarray(rng.integers(0, 256, (2, t, s, s, 3),
                                                              np.uint8)))
  ids = jnp.asarray(rng.integers(5, helpers.SHAPES_VOCAB, (2, config.data.max_text_len)),
                    jnp.int32)
  return model.apply({'params': params}, video, ids)


@pytest.mark.parametrize('fmt', ['safetensors', 'npz'])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_round_trip_gives_identical_params(tmp_path, fmt, variant):
  config, _, params, abstract = _student(VARIANTS[variant])
  out = portable.write(str(tmp_path / 'export'), params, config, '', fmt)
  path = portable.find(out)
  assert path.endswith(portable.FILES[fmt])
  assert portable.read_config(path) == json.loads(json.dumps(config.to_dict()))
  names = set(cio.read_npz(path) if fmt == 'npz' else cio.read_safetensors(path))
  public = {'safetensors': 'vision_model.', 'npz': 'params/img/'}[fmt]
  if variant == 'clip_like':  # not SigLIP's architecture: every name is ours
    assert not any(n.startswith(public) for n in names)
  else:
    first_layer = {'safetensors': 'vision_model.encoder.layers.0.self_attn.q_proj.weight',
                   'npz': 'params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'}
    assert first_layer[fmt] in names
    assert not any(n.startswith('clusterstm/vision/') and n != 'clusterstm/vision/time_embedding'
                   for n in names)
  assert 'clusterstm/text_proj/kernel' in names
  back = portable.read_params(path, config, abstract)
  want, got = cio.flatten(params), cio.flatten(back)
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_round_trip_gives_identical_outputs(tmp_path):
  config, model, params, abstract = _student()
  path = portable.find(portable.write(str(tmp_path / 'e'), params, config, '', 'safetensors'))
  back = portable.read_params(path, config, abstract)
  ours, theirs = _outputs(model, params, config), _outputs(model, back, config)
  for key in ('video_feat', 'text_feat', 'vtm_logits', 'decoded'):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)
  # The vision tower alone, through vit.load (strict: every key is used or ignored by design).
  tower = clusterstm_lib.vision_tower(config.model, config.data.num_frames,
                                     config.data.image_size)
  loaded = vit.load(path, jax.tree.map(np.zeros_like, params['vision']), model=tower)
  for name, value in cio.flatten(params['vision']).items():
    np.testing.assert_array_equal(cio.flatten(loaded)[name], value, err_msg=name)


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch and transformers '
                                          '(pip install -r requirements-test.txt)')
@pytest.mark.parametrize('variant', ['sincos', 'learn'])
def test_transformers_siglip_vision_model_matches_our_tower(tmp_path, variant):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config, _, params, _ = _student(VARIANTS[variant])
  if variant == 'learn':  # HF has no time axis: an image is frame 0, whose time row is zero
    params['vision']['time_embedding'][:, 0] = 0.0
  out = portable.write(str(tmp_path / 'export'), params, config, '', 'safetensors')
  with open(f'{out}/config.json') as f:
    assert json.load(f)['model_type'] == 'siglip_vision_model'
  hf = transformers.SiglipVisionModel.from_pretrained(out).eval()
  s = config.data.image_size
  images = np.random.default_rng(2).uniform(-1, 1, (3, s, s, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = hf(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state
  tower = clusterstm_lib.vision_tower(config.model, config.data.num_frames, s)
  tokens, _ = tower.apply({'params': params['vision']}, jnp.asarray(images)[:, None])  # T = 1
  diff = float(np.max(np.abs(np.asarray(tokens[:, 0]) - theirs.numpy())))
  print(f'\n{variant}: transformers SiglipVisionModel vs ours, max abs diff {diff:.2e}')
  assert diff <= 1e-4
  assert float(np.std(theirs.numpy())) > 0.1


def test_safetensors_metadata_and_unknown_file(tmp_path):
  config, _, params, _ = _student()
  path = portable.find(portable.write(str(tmp_path / 'e'), params, config, '', 'safetensors'))
  with safetensors.safe_open(path, 'np') as f:
    assert f.metadata()['format'] == 'clusterstm_jax'
  assert portable.find(str(tmp_path)) is None
