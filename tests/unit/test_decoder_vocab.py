"""The captioning / QA decoder's vocabulary padded as the student's text table
(config.model.vocab_multiple): the table splits over FSDP, and the padded ids are never
predicted, scored or decoded (a Pico decoder, compared with the same weights unpadded)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import decoding
from clusterstm_jax import losses
from clusterstm_jax.models import text as text_lib
from clusterstm_jax.models import text_decoder
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax.tasks import finetune
from tests import helpers

pytestmark = pytest.mark.unit
PAD, BOS, EOS = 0, 1, 2
VOCAB, MULTIPLE, LEN = 11, 8, 6


def test_padded_decoder_equals_the_unpadded_one_on_the_real_ids():
  padded = text_decoder.TextDecoder(VOCAB, LEN, "Pico", depth=2, vocab_multiple=MULTIPLE)
  plain = text_decoder.TextDecoder(VOCAB, LEN, "Pico", depth=2)
  context = jax.random.normal(jax.random.key(1), (3, 4, 32))
  ids = jnp.asarray([[BOS, 5, 7, 9, EOS, PAD], [BOS, 3, EOS, PAD, PAD, PAD],
                     [BOS, 10, 4, 6, 8, EOS]], jnp.int32)
  params = nn.unbox(padded.init(jax.random.key(0), ids, context))["params"]
  assert params["token_embedding"]["embedding"].shape[0] == 16  # 11 -> the next multiple of 8
  assert params["logits_bias"].shape == (16,)
  # The padded rows made as likely as can be: unmasked, they would win every argmax.
  params["logits_bias"] = params["logits_bias"].at[VOCAB:].set(100.0)
  cut = {**params, "token_embedding": {"embedding": params["token_embedding"]["embedding"][:VOCAB]},
         "logits_bias": params["logits_bias"][:VOCAB]}

  def fn(model, p, ctx=context):
    return jax.jit(lambda i: model.apply({"params": p}, i, ctx))

  padded_fn, plain_fn = fn(padded, params), fn(plain, cut)
  logits = padded_fn(ids)
  assert logits.shape == (3, LEN, 16) and np.all(np.isneginf(logits[..., VOCAB:]))
  np.testing.assert_allclose(logits[..., :VOCAB], plain_fn(ids), rtol=1e-6, atol=1e-6)
  loss = lambda p, model: losses.lm_loss(model.apply({"params": p}, ids, context), ids, PAD)
  np.testing.assert_allclose(loss(params, padded), loss(cut, plain), rtol=1e-6)
  grads = jax.grad(loss)(params, padded)  # -inf logits: zero, not NaN, gradients
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(grads["logits_bias"][VOCAB:] == 0)

  greedy = lambda f: decoding.greedy_decode(f, 3, LEN, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  got, want = greedy(padded_fn), greedy(plain_fn)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  k = 4  # the context tiled batch-major for the 3 x 4 rows
  beam = decoding.beam_search(fn(padded, params, decoding.repeat_rows(context, k)), 3, LEN,
                              bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=k)
  assert np.all(np.asarray(got[0]) < VOCAB) and np.all(np.asarray(beam[0]) < VOCAB)


def test_finetune_decoder_pads_as_the_student_and_bad_multiples_are_refused():
  config = helpers.FINETUNES["caption"][0].get_config("smoke")
  with config.unlocked():
    config.model.vocab_multiple = 64
  task = finetune.build(config, tasks_base.TextSpec(helpers.SHAPES_VOCAB + 1))  # 257 -> 320
  shapes = nn.unbox(jax.eval_shape(task.model.init, jax.random.key(0), *task.init_inputs))
  shapes = shapes["params"]
  assert shapes["text_decoder"]["token_embedding"]["embedding"].shape[0] == 320
  assert shapes["text"]["token_embedding"]["embedding"].shape[0] == 320
  with config.unlocked():
    config.model.vocab_multiple = 0
  with pytest.raises(config_lib.ConfigError, match="model.vocab_multiple=0 must be an int >= 1"):
    config_lib.validate_fields(config)
  with pytest.raises(ValueError, match="vocab_multiple=0"):
    text_lib.padded_vocab(VOCAB, 0)

