"""SentencePiece text tokenizer: training one for a corpus, and encoding fixed-length id batches.

Owns the id conventions the text models rely on: pad = 0, a [CLS] id (sentencepiece BOS) at
position 0 (the text encoder's sentence feature), EOS after the text, and a [MASK] id for MLM.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

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


class Tokenizer:
  """Fixed-length batches of ids: [CLS] text... [SEP] pad...

  For a given real model (e.g. SigLIP's), the model must define a pad id of 0 and a BOS or
  [CLS] piece; [MASK] falls back to the unknown id when the model has no such piece.
  """

  def __init__(self, model_path: str | os.PathLike):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise UserError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{model_path} is not a SentencePiece model "
                      f"({str(e).splitlines()[0][:120]})") from e
    sp = self._sp
    if sp.pad_id() != 0:
      raise UserError(f"tokenizer {model_path} has pad id {sp.pad_id()}; pad id 0 is required")
    cls = sp.bos_id() if sp.bos_id() >= 0 else sp.piece_to_id(CLS_PIECE)
    if cls < 0 or cls == sp.unk_id():
      raise UserError(f"tokenizer {model_path} has neither a BOS nor a {CLS_PIECE} piece")
    self.pad_id, self.cls_id, self.unk_id = 0, int(cls), int(sp.unk_id())
    self.eos_id = int(sp.eos_id())
    if self.eos_id < 0:
      raise UserError(f"tokenizer {model_path} has no EOS piece")
    self.mask_id = int(sp.piece_to_id(MASK_PIECE))  # unk id when the piece is absent
    self.vocab_size = int(sp.get_piece_size())

  def encode_batch(self, texts: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """int32 [B, max_len]: [CLS] pieces [SEP], truncated (keeping [SEP]), right-padded with 0."""
    if max_len < 2:
      raise UserError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    out = np.zeros((len(texts), max_len), np.int32)
    for row, ids in zip(out, self._sp.encode(texts)):
      ids = [self.cls_id] + ids[: max_len - 2] + [self.eos_id]
      row[: len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id row: stops at [SEP], drops [CLS] and padding."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids if i not in (self.pad_id, self.cls_id)])

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
