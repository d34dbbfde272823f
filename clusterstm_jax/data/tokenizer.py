"""Text tokenizers: training a SentencePiece model for a corpus, and encoding fixed-length id
batches with SentencePiece or BERT's WordPiece (data/wordpiece.py); `open_tokenizer` picks one.

Owns the id conventions the text models rely on. The student's (and our own teachers'): pad = 0,
a [CLS] id (sentencepiece BOS) at position 0 (the text encoder's sentence feature), EOS after the
text, and a [MASK] id for MLM. A public SigLIP teacher's (big_vision `eos='sticky'`, transformers'
SiglipTokenizer): no BOS, the pieces then EOS, padded with EOS (`bos=False, pad='eos'`), on
canonicalised text (lower case, no punctuation).
"""
from __future__ import annotations

import io
import os
import re
import string
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from clusterstm_jax.data import wordpiece
from clusterstm_jax.errors import UserError

CLS_PIECE, EOS_PIECE, MASK_PIECE = "[CLS]", "[SEP]", "[MASK]"


def train_sentencepiece(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 256,
                        model_type: str = "bpe") -> str:
  """Trains a model on in-memory texts and writes it atomically to `model_path`.

  Deterministic for a given text sequence (one thread). BPE by default: on a small templated
  corpus a unigram model stops at ~80 pieces and splits common words ("we" -> "w e"), while
  BPE merges up to `vocab_size`, so every word is one piece. `vocab_size` is an upper bound
  (hard_vocab_limit=False): a tiny corpus may support fewer pieces.
  """
  model_path = os.fspath(model_path)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
      hard_vocab_limit=False, model_type=model_type, character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, bos_piece=CLS_PIECE, eos_piece=EOS_PIECE,
      user_defined_symbols=[MASK_PIECE], num_threads=1, minloglevel=2)
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  # Temp file in the same directory + rename: readers never see a half-written model.
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_spm_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(buf.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is ordinary shared data
    os.replace(tmp, model_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return model_path


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
  """SigLIP's text canonicalisation (transformers' SiglipTokenizer, from big_vision's prompt
  engineering): lower case, ASCII punctuation removed, whitespace runs collapsed, stripped."""
  return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class Tokenizer:
  """Fixed-length batches of SentencePiece ids: [CLS] text... [SEP] pad...

  bos: put the model's BOS (or [CLS] piece) first (ours); False for SigLIP (ids then EOS).
  pad: 'pad' pads with the model's pad id, which must be 0 (the student's padding mask);
    'eos' pads with EOS (SigLIP's text tower has no mask and pools the last token).
  canonicalize: SigLIP's text canonicalisation before encoding (`canonicalize`).
  For a given real model with bos=True, the model must define a BOS or [CLS] piece; [MASK]
  falls back to the unknown id when the model has no such piece.
  """

  def __init__(self, model_path: str | os.PathLike, *, bos: bool = True, pad: str = "pad",
               canonicalize: bool = False):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise UserError(f"sentencepiece model not found: {model_path}")
    if pad not in ("pad", "eos"):
      raise UserError(f"tokenizer pad must be 'pad' or 'eos', got {pad!r}")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{model_path} is not a SentencePiece model "
                      f"({str(e).splitlines()[0][:120]})") from e
    sp = self._sp
    self.bos, self.canonicalize = bool(bos), bool(canonicalize)
    self.eos_id = int(sp.eos_id())
    if self.eos_id < 0:
      raise UserError(f"tokenizer {model_path} has no EOS piece")
    if pad == "pad" and sp.pad_id() != 0:
      raise UserError(f"tokenizer {model_path} has pad id {sp.pad_id()}; pad id 0 is required "
                      f"(or pad with EOS: pad='eos')")
    self.pad_id = 0 if pad == "pad" else self.eos_id
    cls = -1  # no [CLS] id: the text starts with its first piece (SigLIP)
    if self.bos:
      cls = sp.bos_id() if sp.bos_id() >= 0 else sp.piece_to_id(CLS_PIECE)
      if cls < 0 or cls == sp.unk_id():
        raise UserError(f"tokenizer {model_path} has neither a BOS nor a {CLS_PIECE} piece "
                        f"(a SigLIP-style model without one: bos=False)")
    self.cls_id, self.unk_id = int(cls), int(sp.unk_id())
    self.mask_id = int(sp.piece_to_id(MASK_PIECE))  # unk id when the piece is absent
    self.vocab_size = int(sp.get_piece_size())

  def encode_batch(self, texts: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """int32 [B, max_len]: [CLS] pieces [SEP] (no [CLS] with bos=False), truncated keeping
    [SEP] (big_vision's sticky EOS), right-padded with the pad id."""
    special = 2 if self.bos else 1
    if max_len < special:
      raise UserError(f"max_len must be >= {special} to hold "
                      f"{'[CLS] and [SEP]' if self.bos else 'EOS'}, got {max_len}")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    if self.canonicalize:
      texts = [canonicalize(t) for t in texts]
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    head = [self.cls_id] if self.bos else []
    # One text at a time: sentencepiece's list call starts its thread pool on every call
    # (~110 us for one caption here, against ~6 us for the string), and the loader encodes
    # one caption per example.
    for row, ids in zip(out, (self._sp.encode(t) for t in texts)):
      ids = head + ids[: max_len - special] + [self.eos_id]
      row[: len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id row: stops at [SEP], drops [CLS] and padding."""
    return self._sp.decode(wordpiece.text_ids(ids, self.eos_id, self.pad_id, self.cls_id))

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def open_tokenizer(path: str | os.PathLike, **conventions):
  """The tokenizer of a file: a BERT WordPiece vocabulary (`vocab.txt`, one piece a line, with
  [CLS] and [SEP]; also under an export's name `tokenizer.model`) -> wordpiece.WordPiece, else a
  SentencePiece model -> Tokenizer(path, **conventions). Both encode the student's layout."""
  path = os.fspath(path)
  if wordpiece.is_vocab_file(path):
    if conventions.get("bos") is False or conventions.get("pad", "pad") != "pad":
      raise UserError(f"{path} is a WordPiece vocabulary: [CLS] first and pad 0 only")
    return wordpiece.WordPiece(path)
  return Tokenizer(path, **conventions)


def export_files(path: str | os.PathLike) -> dict[str, str]:
  """{name: text} of the files an export writes beside its copy of the tokenizer at `path`, so
  that the copy encodes the same ids: a WordPiece vocabulary's tokenizer_config.json with the
  lower-casing it is read with (without it a cased BERT vocabulary would be lower-cased on
  reload); nothing for a SentencePiece model (one self-contained file)."""
  path = os.fspath(path)
  if not wordpiece.is_vocab_file(path):
    return {}
  return {wordpiece.CONFIG_FILE: wordpiece.WordPiece(path).config_json()}
