"""Tokenizer: special ids, fixed-length batches, truncation, round trips, deterministic training."""
import os

import numpy as np
import pytest

from clusterstm_jax.data import shapes
from clusterstm_jax.data.builders import shapes as shapes_builder
from clusterstm_jax.data.tokenizer import Tokenizer, train_sentencepiece

pytestmark = pytest.mark.unit


def _corpus():
  rng = np.random.default_rng(0)
  return [shapes.describe(shapes.sample_scene(rng))["caption"] for _ in range(400)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "m.model"
  train_sentencepiece(_corpus(), path, vocab_size=256)
  return Tokenizer(path)


def test_special_ids(tok):
  sp = tok._sp
  assert (tok.pad_id, tok.cls_id, tok.eos_id) == (0, 2, 3)
  assert sp.id_to_piece(tok.cls_id) == "[CLS]" and sp.id_to_piece(tok.eos_id) == "[SEP]"
  assert sp.id_to_piece(tok.mask_id) == "[MASK]" and tok.mask_id not in (0, 1, 2, 3)
  assert tok.vocab_size == sp.get_piece_size() and 64 < tok.vocab_size <= 256


def test_encode_batch_layout_and_round_trip(tok):
  texts = ["a small red circle moves left", b"we see a large blue square staying still", ""]
  ids = tok.encode_batch(texts, 16)
  assert ids.dtype == np.int32 and ids.shape == (3, 16)
  for row, text in zip(ids, texts):
    text = text.decode() if isinstance(text, bytes) else text
    n = int((row != 0).sum())
    assert row[0] == tok.cls_id and row[n - 1] == tok.eos_id
    assert np.all(row[n:] == 0) and tok.eos_id not in row[1:n - 1]
    # The ids between [CLS] and [SEP] are sentencepiece's own encoding of the text.
    assert row[1:n - 1].tolist() == tok._sp.encode(text)
    assert tok.decode(row) == text
  # Whole words are single pieces on the synthetic corpus, so captions stay short.
  assert len(tok._sp.encode("a small red circle moves left")) == 6


def test_truncation_keeps_eos(tok):
  text = "a small red circle moves left and a large blue square stays still"
  ids = tok.encode_batch([text], 5)[0]
  assert ids.tolist() == [tok.cls_id] + tok._sp.encode(text)[:3] + [tok.eos_id]
  assert tok.decode(ids) == "a small red"


def test_mask_token_decodes(tok):
  ids = tok.encode_batch(["a small red circle"], 10)[0]
  ids[2] = tok.mask_id
  # [MASK] carries no word-boundary marker, so it attaches to the previous word.
  assert tok.decode(ids) == "a[MASK] red circle"


def test_training_is_deterministic_and_atomic(tmp_path):
  a, b = tmp_path / "a.model", tmp_path / "b.model"
  train_sentencepiece(_corpus(), a, 256)
  train_sentencepiece(_corpus(), b, 256)
  assert a.read_bytes() == b.read_bytes()
  assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temp files left behind


def test_errors(tmp_path, tok):
  with pytest.raises(ValueError, match="not found"):
    Tokenizer(tmp_path / "missing.model")
  with pytest.raises(ValueError, match="max_len"):
    tok.encode_batch(["x"], 1)


def test_shapes_captions_fit_default_length(tmp_path):
  # Every caption of a split encodes in 32 ids without truncation (the default max_text_len).
  cfg = shapes_builder.Shapes.BUILDER_CONFIGS[1]
  scenes = [s for _, _, s in shapes_builder.split_items(cfg, "val")]
  texts = shapes_builder.tokenizer_texts(scenes)
  assert len(texts) > len(scenes)  # captions, then questions and answers
  tok = Tokenizer(train_sentencepiece(texts, tmp_path / "s.model", 256))
  captions = [shapes.caption(s) for s in scenes]
  ids = tok.encode_batch(captions, 64)
  assert (ids != 0).sum(1).max() <= 32
  for row, cap in zip(ids, captions):
    assert tok.decode(row) == cap
