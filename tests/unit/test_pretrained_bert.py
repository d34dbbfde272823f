"""BERT initialisation of the text tower: a Hugging Face BERT checkpoint (safetensors) loaded
by models/text.py's `load` gives transformers' BertModel hidden states and MLM logits.

Tiny random BERTs are built with transformers (torch on CPU), saved with save_pretrained and
compared on the same ids; skipped without torch / transformers."""
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax.models import checkpoint_io as cio
from clusterstm_jax.models import text as text_lib
from tests import helpers

pytestmark = pytest.mark.unit
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
torch_only = pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
VOCAB, D, LAYERS, HEADS, MLP, POSITIONS, LEN, VIDEO_D = 99, 64, 3, 2, 256, 16, 10, 48
TOL = 1e-5


def _encoder(**options):
  return text_lib.TextEncoder(vocab_size=VOCAB, max_len=LEN, variant="Mu", num_layers=LAYERS,
                              num_fusion_layers=1, **options)


def _template(model):
  ids = jnp.ones((2, LEN), jnp.int32)
  # Video tokens narrower than the text: video_proj exists (and stays fresh).
  return jax.jit(model.init)(jax.random.key(0), ids, jnp.zeros((2, 3, VIDEO_D)))["params"]


def _ids():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (3, LEN))
  ids[:, 0] = 2
  ids[1, 6:] = 0  # padding: masked out of attention on both sides
  return ids


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
  model = helpers.random_bert(VOCAB, D, LAYERS, HEADS, MLP, POSITIONS)
  mlm_dir, base_dir = tmp_path_factory.mktemp("bert_mlm"), tmp_path_factory.mktemp("bert_base")
  model.save_pretrained(str(mlm_dir))       # keys 'bert.*' and 'cls.*', as bert-base-uncased
  model.bert.save_pretrained(str(base_dir))  # a BertModel: no prefix, no MLM head
  return model, str(mlm_dir), str(base_dir)


def _torch_states(model, ids):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    t_ids = torch.as_tensor(ids)
    out = model.bert(t_ids, attention_mask=(t_ids != 0).long(), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@torch_only
@pytest.mark.parametrize("which", ["masked_lm", "bert_model"])
def test_bert_hidden_states_match_transformers(hf_bert, which):
  model_t, mlm_dir, base_dir = hf_bert
  model = _encoder(**text_lib.BERT_OPTIONS)
  template = _template(model)
  params = text_lib.load(mlm_dir if which == "masked_lm" else base_dir, template, model=model)
  ids = _ids()
  states = _torch_states(model_t, ids)
  ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.encode)
  # encode = the embeddings and the LAYERS - 1 text-only layers.
  np.testing.assert_allclose(np.asarray(ours), states[LAYERS - 1], rtol=0, atol=TOL)

  flat, tflat = cio.flatten(nn.unbox(params)), cio.flatten(nn.unbox(template))
  sd = model_t.state_dict()
  sd = {k[len("bert."):] if k.startswith("bert.") else k: v.numpy() for k, v in sd.items()}
  # The last BERT layer fills the fusion block; its cross-attention stays as initialised.
  block = "fusion_encoder/encoderblock_0"
  np.testing.assert_array_equal(flat[f"{block}/MlpBlock_0/Dense_0/kernel"],
                                sd[f"encoder.layer.{LAYERS - 1}.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(flat[f"{block}/LayerNorm_1/scale"],
                                sd[f"encoder.layer.{LAYERS - 1}.output.LayerNorm.weight"])
  for name in flat:
    if "/cross_" in name or name.startswith("video_proj/"):
      np.testing.assert_array_equal(flat[name], tflat[name])
  if which == "masked_lm":
    # The MLM head on BERT's last hidden states: transformers' logits.
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      want = model_t.cls(torch.as_tensor(states[LAYERS])).numpy()
    got = model.apply({"params": params}, jnp.asarray(states[LAYERS]), method=model.mlm_logits)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
  else:
    np.testing.assert_array_equal(flat["mlm_bias"], tflat["mlm_bias"])  # no head: kept


@torch_only
def test_bert_needs_the_bert_architecture(hf_bert):
  _, mlm_dir, _ = hf_bert
  model = _encoder()  # our default pre-LN tower
  with pytest.raises(cio.CheckpointError, match="post_ln"):
    text_lib.load(mlm_dir, _template(model), model=model)


def test_default_text_tower_unchanged_by_the_bert_options():
  """The BERT options are off by default: no embedding norm, final norms kept, tanh GELU."""
  names = set(cio.flatten(_template(_encoder())))
  assert "embedding_norm/scale" not in names and "text_encoder/encoder_norm/scale" in names
  bert = set(cio.flatten(_template(_encoder(**text_lib.BERT_OPTIONS))))
  assert "embedding_norm/scale" in bert and "text_encoder/encoder_norm/scale" not in bert


@torch_only
def test_padded_vocabulary_keeps_the_extra_rows(hf_bert):
  """A table padded past BERT's vocabulary (config.model.vocab_multiple, for FSDP): the first
  rows are BERT's, the padded rows (never input ids) keep their initial values."""
  model_t, mlm_dir, _ = hf_bert
  model = text_lib.TextEncoder(vocab_size=VOCAB + 5, max_len=LEN, variant="Mu",
                               num_layers=LAYERS, num_fusion_layers=1, **text_lib.BERT_OPTIONS)
  template = _template(model)
  flat = cio.flatten(nn.unbox(text_lib.load(mlm_dir, template, model=model)))
  tflat = cio.flatten(nn.unbox(template))
  sd = model_t.state_dict()
  emb = flat["token_embedding/embedding"]
  np.testing.assert_array_equal(emb[:VOCAB], sd["bert.embeddings.word_embeddings.weight"].numpy())
  np.testing.assert_array_equal(emb[VOCAB:], tflat["token_embedding/embedding"][VOCAB:])
  np.testing.assert_array_equal(flat["mlm_bias"][:VOCAB], sd["cls.predictions.bias"].numpy())
