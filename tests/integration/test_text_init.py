"""config.model.text_init: a training run starts its student's text tower from a Hugging Face
BERT checkpoint (loop.py -> clusterstm.load_text_pretrained -> text.load).

A tiny random BERT shaped as the smoke text tower (Pico: width 32, 2 heads, MLP 64, 2 layers,
the last one the fusion layer) is saved with transformers; one teacherless smoke step at
learning rate 0 is checkpointed, and the checkpoint's text tower holds BERT's weights.
Skipped without torch / transformers."""
import importlib.util

import jax
import numpy as np
import pytest

from clusterstm_jax import loading
from clusterstm_jax import loop
from clusterstm_jax.data import pipeline
from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import clusterstm as clusterstm_lib
from clusterstm_jax.models import text as text_lib
from tests import helpers

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not all(importlib.util.find_spec(m)
                                         for m in ('torch', 'transformers')),
                                 reason='needs torch and transformers')]


def _tiny_bert(out_dir, vocab_size: int, positions: int):
  """A random BertForMaskedLM shaped as the smoke text tower, saved in `out_dir` (keys 'bert.*'
  and 'cls.*', as bert-base-uncased); returns its state dict as numpy, 'bert.' dropped."""
  model = helpers.random_bert(vocab_size, 32, 2, 2, 64, positions)
  model.save_pretrained(str(out_dir))
  return {k.removeprefix('bert.'): v.numpy() for k, v in model.state_dict().items()}


def test_text_init_starts_the_text_tower_from_bert(shared_smoke, tmp_path):
  base = helpers.teacherless_config(**{'data.data_dir': shared_smoke.data_dir})
  pipeline.get_source(base.data, base.data.train_split)  # the tiny split, built on first use
  vocab, length = pipeline.get_tokenizer(base.data).vocab_size, base.data.max_text_len
  sd = _tiny_bert(tmp_path / 'bert', vocab, length)
  config = helpers.teacherless_config(**{
      'data.data_dir': shared_smoke.data_dir, 'model.text_init': str(tmp_path / 'bert'),
      'model.text_options': dict(text_lib.BERT_OPTIONS),
      'optax.lr': 0.0,  # the checkpoint after one step holds the initial params
      'halt_at_step': 1, 'checkpoint_every_steps': 1})
  workdir = str(tmp_path / 'run')
  assert loop.run(config, workdir) == {'step': 1, 'halted': True}
  run_config, params, tokenizer, _ = loading.load_model(workdir)
  assert run_config.model.text_init == str(tmp_path / 'bert')
  text = cio.flatten(jax.device_get(params['text']))

  # BERT's arrays where text.load puts them (block 0 is text-only, block 1 the fusion layer).
  e, layer = 'embeddings', 'encoder.layer'
  np.testing.assert_array_equal(text['token_embedding/embedding'],
                                sd[f'{e}.word_embeddings.weight'])
  np.testing.assert_allclose(text['pos_embedding'][0],  # token type 0 folded in
                             sd[f'{e}.position_embeddings.weight'][:length]
                             + sd[f'{e}.token_type_embeddings.weight'][0], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(text['embedding_norm/scale'], sd[f'{e}.LayerNorm.weight'])
  np.testing.assert_array_equal(text['text_encoder/encoderblock_0/MlpBlock_0/Dense_0/kernel'],
                                sd[f'{layer}.0.intermediate.dense.weight'].T)
  np.testing.assert_array_equal(text['fusion_encoder/encoderblock_0/LayerNorm_1/scale'],
                                sd[f'{layer}.1.output.LayerNorm.weight'])
  np.testing.assert_array_equal(text['mlm_bias'], sd['cls.predictions.bias'])
  # Everything BERT provides is already there: loading it again changes no array.
  tower = clusterstm_lib.text_tower(run_config.model, tokenizer.vocab_size, length)
  again = cio.flatten(jax.device_get(text_lib.load(str(tmp_path / 'bert'),
                                                   jax.device_get(params['text']), model=tower)))
  assert sorted(again) == sorted(text)
  for name, array in text.items():
    np.testing.assert_array_equal(again[name], array, err_msg=name)
