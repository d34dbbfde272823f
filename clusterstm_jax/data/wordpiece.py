"""BERT's WordPiece tokenisation (through the `tokenizers` library) in the student's id layout:
[CLS] pieces [SEP], truncated keeping [SEP], padded with [PAD] = 0; [MASK] for MLM.

The pipeline is BertTokenizerFast's (BertNormalizer: clean text, Chinese characters split,
accents stripped when lower-casing; BertPreTokenizer; WordPiece with '##' continuations), built
from a `vocab.txt`, so a BERT checkpoint's text tower sees the ids it was trained on. Lower case
follows `do_lower_case` of a `tokenizer_config.json` beside the vocabulary (default: True, as
bert-base-uncased).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers

from clusterstm_jax.errors import UserError

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "tokenizer_config.json"  # beside the vocabulary (transformers' name)
_SNIFF_BYTES = 1 << 20


def is_vocab_file(path: str) -> bool:
  """Whether `path` is a WordPiece vocabulary: UTF-8 text, one piece a line, with [CLS] and
  [SEP] lines (a SentencePiece model is a binary protobuf)."""
  try:
    with open(path, "rb") as f:
      head = f.read(_SNIFF_BYTES).decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return False
  lines = set(head.splitlines())
  return "[CLS]" in lines and "[SEP]" in lines


def _lowercase(vocab_path: str) -> bool:
  cfg = os.path.join(os.path.dirname(os.path.abspath(vocab_path)), CONFIG_FILE)
  if not os.path.exists(cfg):
    return True
  try:
    with open(cfg) as f:
      return bool(json.load(f).get("do_lower_case", True))
  except ValueError as e:
    raise UserError(f"cannot parse {cfg}: {e}") from e


def text_ids(ids, eos_id: int, pad_id: int, cls_id: int) -> list[int]:
  """The ids of one row that are text (both tokenizers' decode): up to the first EOS/[SEP],
  without padding and [CLS]."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  if eos_id in ids:
    ids = ids[: ids.index(eos_id)]
  return [i for i in ids if i not in (pad_id, cls_id)]

class WordPiece:
  """Fixed-length batches of BERT WordPiece ids (the interface of tokenizer.Tokenizer)."""

  def __init__(self, vocab_path: str | os.PathLike, *, lowercase: bool | None = None):
    vocab_path = os.fspath(vocab_path)
    if not os.path.isfile(vocab_path):
      raise UserError(f"WordPiece vocabulary not found: {vocab_path}")
    with open(vocab_path, encoding="utf-8") as f:
      vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    missing = [p for p in SPECIAL if p not in vocab]
    if missing:
      raise UserError(f"WordPiece vocabulary {vocab_path} lacks {', '.join(missing)}")
    if vocab["[PAD]"] != 0:
      raise UserError(f"WordPiece vocabulary {vocab_path} has [PAD] at {vocab['[PAD]']}; "
                      f"pad id 0 is required")
    self.model_path = vocab_path
    self.lowercase = _lowercase(vocab_path) if lowercase is None else bool(lowercase)
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=self.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    self._tok = tok
    self.bos, self.canonicalize = True, False
    self.pad_id, self.unk_id, self.cls_id, self.eos_id, self.mask_id = (
        vocab[p] for p in SPECIAL)
    self.vocab_size = len(vocab)

  def config_json(self) -> str:
    """The tokenizer_config.json that makes a copy of the vocabulary encode these ids (what an
    export writes beside its copy): the lower-casing this tokenizer applies."""
    return json.dumps({"do_lower_case": self.lowercase}, indent=1) + "\n"

  def encode_batch(self, texts: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """int32 [B, max_len]: [CLS] pieces [SEP], truncated keeping [SEP], right-padded with 0."""
    if max_len < 2:
      raise UserError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    out = np.zeros((len(texts), max_len), np.int32)
    for row, enc in zip(out, self._tok.encode_batch(texts, add_special_tokens=False)):
      ids = [self.cls_id] + enc.ids[: max_len - 2] + [self.eos_id]
      row[: len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id row: stops at [SEP], drops [CLS] and padding."""
    return self._tok.decode(text_ids(ids, self.eos_id, self.pad_id, self.cls_id),
                            skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"WordPiece({self.model_path!r}, vocab_size={self.vocab_size})"
