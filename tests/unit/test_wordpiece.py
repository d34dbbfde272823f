"""BERT WordPiece tokenisation (data/wordpiece.py): the ids of transformers' BertTokenizerFast
on a tiny vocabulary built here, in the student's fixed-length layout; a cased vocabulary
stays cased through an export."""
import importlib.util
import os

import numpy as np
import pytest

from clusterstm_jax.data import wordpiece
from clusterstm_jax.data.tokenizer import open_tokenizer, train_sentencepiece
from clusterstm_jax.errors import UserError

pytestmark = pytest.mark.unit
HAS_HF = importlib.util.find_spec("transformers") is not None

PIECES = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "small", "red",
          "circle", "move", "##s", "left", "blue", "square", "stay", "##ing", "still", "we",
          "see", "large", ",", ".", "!", "e", "##e", "caf", "##é", "##e", "two", "green"]
TEXTS = ["A small red circle moves left.", "We see a LARGE blue square, staying still!",
         "Café moves", "two zebras", "", "a small red circle moves left and a blue square "
         "moves left and the green circle stays still"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("wp") / "vocab.txt"
  seen, lines = set(), []
  for p in PIECES:  # unique lines, in order
    if p not in seen:
      seen.add(p)
      lines.append(p)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_layout_and_special_ids(vocab):
  tok = open_tokenizer(vocab)
  assert isinstance(tok, wordpiece.WordPiece)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4, 5)
  ids = tok.encode_batch(TEXTS, 8)
  assert ids.shape == (len(TEXTS), 8) and ids.dtype == np.int32
  assert np.all(ids[:, 0] == tok.cls_id)
  for row in ids:
    n = int((row != 0).sum())
    assert row[n - 1] == tok.eos_id and np.all(row[n:] == 0)  # [SEP] kept on truncation
  assert tok.decode(ids[0]) == "a small red circle moves"  # truncated to 6 pieces
  assert tok.decode(tok.encode_batch(TEXTS[:1], 16)[0]) == "a small red circle moves left."
  with pytest.raises(UserError, match="max_len"):
    tok.encode_batch(["a"], 1)


@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
def test_ids_match_bert_tokenizer_fast(vocab):
  import transformers  # pylint: disable=g-import-not-at-top
  # What BERT checkpoints ship: a directory with vocab.txt (bert-base-uncased lower-cases).
  hf = transformers.BertTokenizerFast.from_pretrained(os.path.dirname(vocab), do_lower_case=True)
  for length in (8, 24):
    want = hf(TEXTS, padding="max_length", truncation=True, max_length=length)["input_ids"]
    np.testing.assert_array_equal(open_tokenizer(vocab).encode_batch(TEXTS, length),
                                  np.asarray(want))


def test_sentencepiece_is_not_a_vocab_and_bad_vocabularies(vocab, tmp_path):
  spm_path = train_sentencepiece(["a small red circle"] * 20, tmp_path / "m.model", 40)
  assert not wordpiece.is_vocab_file(spm_path) and wordpiece.is_vocab_file(vocab)
  bad = tmp_path / "vocab.txt"
  bad.write_text("[CLS]\n[PAD]\n[SEP]\n[UNK]\n[MASK]\n")
  with pytest.raises(UserError, match="pad id 0"):
    wordpiece.WordPiece(str(bad))
  with pytest.raises(UserError, match="WordPiece"):
    open_tokenizer(vocab, bos=False)


CASED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "World", "hello", "world", "!"]


@pytest.mark.parametrize("fmt", ["orbax", "npz"])
def test_export_keeps_a_cased_vocabulary_cased(tmp_path, fmt):
  # A cased BERT ships vocab.txt + tokenizer_config.json {"do_lower_case": false}; the export
  # copies the vocabulary as tokenizer.model and must carry the casing with it.
  from clusterstm_jax import exports, portable, teacher  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  src = tmp_path / "bert-cased"
  src.mkdir()
  (src / "vocab.txt").write_text("\n".join(CASED) + "\n", encoding="utf-8")
  (src / wordpiece.CONFIG_FILE).write_text('{"do_lower_case": false}')
  cased, uncased = open_tokenizer(src / "vocab.txt"), wordpiece.WordPiece(src / "vocab.txt",
                                                                           lowercase=True)
  want = cased.encode_batch(["Hello World!"], 6)
  np.testing.assert_array_equal(want, [[2, 5, 6, 9, 3, 0]])
  assert not np.array_equal(want, uncased.encode_batch(["Hello World!"], 6))  # [2, 7, 8, ...]
  out, params, config = str(tmp_path / "export"), {"w": np.zeros(2, np.float32)}, \
      helpers.smoke_config()
  if fmt == "orbax":
    exports.write_export(out, params, config, str(src / "vocab.txt"))
    exports.verify(out)  # the tokenizer_config.json is in the manifest
    # A teacher exported with a BERT vocabulary: its text tower's size comes from the vocab.txt.
    assert teacher._vocab_size(out) == len(CASED)  # pylint: disable=protected-access
  else:
    portable.write(out, params, config, str(src / "vocab.txt"), fmt)
  reloaded = open_tokenizer(exports.tokenizer_path(out))
  assert isinstance(reloaded, wordpiece.WordPiece) and not reloaded.lowercase
  np.testing.assert_array_equal(reloaded.encode_batch(["Hello World!"], 6), want)
  assert reloaded.decode(want[0]) == "Hello World!"
