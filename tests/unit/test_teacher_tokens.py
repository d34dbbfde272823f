"""Two token streams: the student's ids and the teacher's own ids (its tokenizer), a public
SigLIP's SentencePiece layout without BOS (ids, EOS, EOS padding), and the MRM step reading the
teacher's ids."""
import importlib.util
import io

import flax.linen as nn
import jax
import numpy as np
import pytest
import sentencepiece as spm

from clusterstm_jax import config_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data import pipeline
from clusterstm_jax.data import video_io
from clusterstm_jax.data.tokenizer import Tokenizer, open_tokenizer, train_sentencepiece
from clusterstm_jax.errors import UserError
from clusterstm_jax.models import siglip
from clusterstm_jax.tasks import base as tasks_base

pytestmark = pytest.mark.unit
HAS_HF = all(importlib.util.find_spec(m) for m in ("transformers", "sentencepiece"))

CAPTIONS = ["A small red circle moves left.", "We see a large blue square, staying still!",
            "two green triangles bounce", "a yellow star rotates slowly", "nothing moves here"]


def _corpus():
  words = "a the small large red blue green yellow circle square triangle star moves left " \
          "right up down still slowly quickly bounce rotates we see two nothing here staying"
  rng = np.random.default_rng(0)
  vocab = words.split()
  return [" ".join(rng.choice(vocab, 6)) for _ in range(300)] + CAPTIONS


def train_siglip_style(path, vocab_size=80):
  """A T5/SigLIP-style SentencePiece model: pad 0, EOS 1 ('</s>'), unk 2, and no BOS piece."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size,
      hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      num_threads=1, minloglevel=2)
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  student = train_sentencepiece(_corpus(), d / "student.model", vocab_size=120)
  return student, train_siglip_style(d / "siglip.model")


def test_siglip_layout_no_bos_eos_padding(models):
  _, path = models
  with pytest.raises(UserError, match="neither a BOS"):
    Tokenizer(path)  # our layout needs a [CLS]/BOS
  tok = Tokenizer(path, bos=False, pad="eos", canonicalize=True)
  assert (tok.cls_id, tok.eos_id, tok.pad_id) == (-1, 1, 1)
  ids = tok.encode_batch(CAPTIONS[:2], 12)
  for row, text in zip(ids, CAPTIONS[:2]):
    pieces = tok._sp.encode(text.lower().replace(".", "").replace(",", "").replace("!", ""))
    n = min(len(pieces), 11)
    assert row[:n].tolist() == pieces[:n] and row[n] == tok.eos_id  # ids, then EOS
    assert np.all(row[n:] == tok.eos_id)  # padded with EOS: the last token is EOS
  assert tok.encode_batch(["a b c d e f g h i j k l m n"], 4)[0, -1] == tok.eos_id  # sticky EOS
  assert tok.decode(ids[0]) == "a small red circle moves left"


@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
def test_siglip_layout_matches_transformers_siglip_tokenizer(models):
  import transformers  # pylint: disable=g-import-not-at-top
  _, path = models
  hf = transformers.SiglipTokenizer(vocab_file=path)
  ours = Tokenizer(path, bos=False, pad="eos", canonicalize=True).encode_batch(CAPTIONS, 16)
  theirs = hf(CAPTIONS, padding="max_length", max_length=16, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_open_tokenizer_conventions(models):
  student, path = models
  assert isinstance(open_tokenizer(student), Tokenizer)
  with pytest.raises(UserError, match="pad"):
    Tokenizer(path, bos=False, pad="zero")


def _example(caption, frames=2, size=16):
  rng = np.random.default_rng(0)
  jpegs = [video_io.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
           for _ in range(frames)]
  return {"frames": jpegs, "caption": caption, "labels": None, "id": 3}


def test_decode_example_carries_both_streams(models):
  student, path = models
  s_tok, t_tok = open_tokenizer(student), Tokenizer(path, bos=False, pad="eos", canonicalize=True)
  out = pipeline.decode_example(_example(CAPTIONS[0]), tokenizer=s_tok, num_frames=2,
                                image_size=16, max_text_len=10, rng=None,
                                teacher_tokenizer=t_tok, teacher_text_len=16)
  np.testing.assert_array_equal(out["text"], s_tok.encode_batch([CAPTIONS[0]], 10)[0])
  np.testing.assert_array_equal(out["teacher_text"], t_tok.encode_batch([CAPTIONS[0]], 16)[0])
  assert out["text"][0] == s_tok.cls_id and out["teacher_text"][0] != t_tok.eos_id
  # The same tokenizer for both (shapes' default teacher): the same ids.
  same = pipeline.decode_example(_example(CAPTIONS[0]), tokenizer=s_tok, num_frames=2,
                                 image_size=16, max_text_len=10, rng=None,
                                 teacher_tokenizer=s_tok, teacher_text_len=10)
  np.testing.assert_array_equal(same["text"], same["teacher_text"])


def test_teacher_tokenizer_from_config(models, tmp_path):
  _, path = models
  config = config_lib.load_config_file("configs/pretrain.py:smoke")
  with config.unlocked():
    config.teacher.init = str(tmp_path / "siglip.npz")
    with pytest.raises(UserError, match="tokenizer.model"):
      teacher_lib.tokenizer_path(config)  # external weights need their own tokenizer
    config.teacher.tokenizer.update(model=path, bos=False, pad="eos", canonicalize=True)
  tok = teacher_lib.load_tokenizer(config)
  assert tok.model_path == path and (tok.cls_id, tok.pad_id) == (-1, tok.eos_id)


def test_mrm_step_reads_the_teachers_own_ids(models):
  """A SigLIP-style tokenizer feeds the teacher (its own vocabulary and length, 16 against the
  student's 10); the step runs, and MRM changes with the teacher's ids alone."""
  student, path = models
  s_tok, t_tok = open_tokenizer(student), Tokenizer(path, bos=False, pad="eos", canonicalize=True)
  assert s_tok.vocab_size != t_tok.vocab_size
  config = config_lib.load_config_file("configs/pretrain.py:smoke").copy_and_resolve_references()
  with config.unlocked():
    config.data.max_text_len = 10
    config.data.image_size = 32
    config.batch_size = 8
  mesh = sharding_lib.make_mesh(config.mesh)
  tmodel = siglip.SigLIP("Pico/8", image_size=32, vocab_size=t_tok.vocab_size, text_len=16)
  tparams = nn.unbox(jax.jit(lambda r: tmodel.init(
      r, np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 16), np.int32)))(jax.random.key(1))
                     )["params"]
  repl = sharding_lib.replicated(mesh)
  teacher = teacher_lib.Teacher(model=tmodel, params=jax.device_put(tparams, repl),
                                param_shardings=jax.tree.map(lambda _: repl, tparams),
                                tokenizer=t_tok)
  assert teacher.text_stream == (t_tok, 16)
  trainer = trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                      teacher=teacher,
                                      text=tasks_base.TextSpec.from_tokenizer(s_tok))
  batch = trainer.task.dummy_batch(8)
  assert batch["teacher_text"].shape == (8, 16) and batch["text"].shape == (8, 10)
  rng = np.random.default_rng(0)
  caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(8)]
  batch["video"] = rng.integers(0, 256, batch["video"].shape, dtype=np.uint8)
  batch["text"] = s_tok.encode_batch(caps, 10)
  batch["teacher_text"] = t_tok.encode_batch(caps, 16)
  assert not np.array_equal(batch["text"][:, :10], batch["teacher_text"][:, :10])

  state = trainer.init_state(jax.random.key(0))
  params = jax.device_get(state["params"])
  loss_fn = jax.jit(lambda b: trainer.task.loss_fn(params, b, jax.random.key(3), tparams))
  loss, metrics = loss_fn(batch)
  assert np.isfinite(float(loss)) and float(metrics["mrm"]) > 0
  # Other teacher ids, same student ids: only MRM (the teacher's text feature) moves.
  other = dict(batch, teacher_text=t_tok.encode_batch(caps[::-1], 16))
  _, metrics2 = loss_fn(other)
  assert float(metrics2["mrm"]) != float(metrics["mrm"])
  for k in ("vtc", "vtm", "mlm"):
    assert float(metrics2[k]) == float(metrics[k])
  # A batch without the teacher's ids is refused (never silently the student's ids).
  with pytest.raises(ValueError, match="teacher_text"):
    loss_fn({k: v for k, v in batch.items() if k != "teacher_text"})
  # The jitted train step takes the two-stream batch.
  state, m = trainer.train_step(state, sharding_lib.global_batch(batch, mesh), jax.random.key(0))
  assert np.isfinite(float(m["loss"]))
