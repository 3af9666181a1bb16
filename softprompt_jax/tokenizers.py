"""Vocabularies: text <-> token ids, as seqio's SentencePieceVocabulary and ByteVocabulary do.

Every vocabulary here reserves pad 0, eos 1 and unk 2. `encode` never adds EOS; `decode` stops at
the first EOS. `encode_batch` makes the fixed-length int32 arrays the model reads. Text that is not
Unicode (a lone surrogate) and ids that are not integers raise a TokenizerInputError.
"""

from __future__ import annotations

import abc
import json
import numbers
import os
import pathlib
import struct
import threading
import warnings
from typing import Iterable, Sequence

import numpy as np
import sentencepiece

from softprompt_jax.errors import UserError
from softprompt_jax.paths import local_path

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class TokenizerInputError(UserError, ValueError):
  """Text that cannot be encoded or ids that cannot be decoded; the message names the culprit."""


class Vocabulary(abc.ABC):
  """What the data pipeline needs from a vocabulary."""

  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  unk_id: int = UNK_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, sentinels included (the model's embedding may have more rows)."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS."""

  def encode_batch(self, texts: Sequence[str], max_length: int,
                   add_eos: bool = True) -> np.ndarray:
    """int32 [len(texts), max_length]: each text encoded, trimmed, EOS added, padded with 0.

    With `add_eos`, EOS is appended after trimming (seqio's `append_eos_after_trim`), so every row
    ends in EOS. To count the trimmed texts, call `pad_batch` on `encode`'s output instead.
    """
    ids, _ = pad_batch([self.encode(t) for t in texts], max_length,
                       eos_id=self.eos_id if add_eos else None, pad_id=self.pad_id)
    return ids

  def decode_batch(self, ids_BxL: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(row) for row in ids_BxL]


def pad_batch(sequences: Sequence[Sequence[int]], max_length: int, *, eos_id: int | None = None,
              pad_id: int = PAD_ID) -> tuple[np.ndarray, int]:
  """(int32 [len(sequences), max_length], number of sequences that were cut).

  Each sequence is trimmed to fit, then `eos_id` (if given) is appended, then pad_id fills the rest.
  """
  if max_length < 1:
    raise ValueError(f"pad_batch: max_length must be at least 1; got {max_length}")
  room = max_length - (eos_id is not None)
  ids_BxL = np.full((len(sequences), max_length), pad_id, dtype=np.int32)
  num_truncated = 0
  for row, seq in enumerate(sequences):
    seq = list(seq)
    num_truncated += len(seq) > room
    seq = seq[:room] + ([eos_id] if eos_id is not None else [])
    ids_BxL[row, :len(seq)] = seq
  return ids_BxL, num_truncated


def sentinel_id(vocab: Vocabulary, index: int = 0) -> int:
  """Id of the `index`-th span-corruption sentinel: counted down from the top of the vocabulary.

  seqio's rule (`vocab_size - 1 - index`): `<extra_id_0>` = 32099 for T5's vocabulary; for ByT5,
  which has no extra ids, the top byte ids 258, 257, ... (bytes 0xFF, 0xFE, ...).
  """
  return vocab.vocab_size - 1 - index


def _as_id_list(ids: Iterable[int]) -> list[int]:
  """`ids` as Python ints (of any size: the vocabularies read ids out of range as unk)."""
  if isinstance(ids, (str, bytes)):
    raise TokenizerInputError(f"decode takes a sequence of int ids; got {type(ids).__name__}")
  if hasattr(ids, "__array__"):  # numpy / jax arrays: integer ones need no checks
    array = np.asarray(ids)
    if array.ndim != 1:
      raise TokenizerInputError(f"decode takes one sequence of ids; got shape {array.shape} "
                                "(use decode_batch for a batch)")
    if array.dtype.kind in "iub":
      return array.tolist()
  values = []
  for position, value in enumerate(ids):
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
      if not float(value).is_integer():  # NaN, inf and fractions are not ids
        raise TokenizerInputError(f"decode: the id at position {position} is {value!r}, not "
                                  "an integer")
      value = int(value)
    if not isinstance(value, numbers.Integral):
      nested = isinstance(value, Iterable) and not isinstance(value, (str, bytes))
      hint = " (use decode_batch for a batch)" if nested else ""
      raise TokenizerInputError(f"decode: the id at position {position} is "
                                f"{type(value).__name__} {value!r}, not an integer{hint}")
    values.append(int(value))
  return values


def _check_text(text: str) -> None:
  if not isinstance(text, str):
    raise TypeError(f"encode takes one str; got {type(text).__name__} (use encode_batch for many)")


def _lone_surrogate_error(text: str) -> TokenizerInputError:
  position = next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
  return TokenizerInputError(f"encode: the text holds a lone surrogate {ascii(text[position])} "
                             f"at position {position}, which is not Unicode text (was it "
                             "decoded with errors='surrogateescape'?)")


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


# --- SentencePiece ---------------------------------------------------------------------------

# sentencepiece's ModelProto.SentencePiece.Type.USER_DEFINED: matched verbatim, never split.
_USER_DEFINED = 4
# Loading a serialized model is not thread-safe in sentencepiece (seqio met crashes without a lock).
_LOAD_LOCK = threading.Lock()


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _user_defined_pieces(pieces: Sequence[str]) -> bytes:
  """Serialized `ModelProto.pieces` entries (field 1) for `pieces`, score 0, USER_DEFINED.

  Concatenating these to a serialized ModelProto appends them to its repeated `pieces` field (the
  protobuf wire format merges repeated fields), which is what seqio does through protobuf's
  `model.pieces.add(...)` (tests/test_tokenizers.py checks the result against that recipe). The
  bytes are written by hand rather than through sentencepiece's generated
  `sentencepiece_model_pb2`: the wire format is fixed, while that generated module refuses to
  import under a protobuf runtime older than the protoc that generated it. So the library needs
  no protobuf; only the tests' references (transformers' T5Tokenizer, seqio's recipe) do.
  """
  out = []
  for piece in pieces:
    entry = (_length_delimited(1, piece.encode("utf-8"))     # piece: string
             + _varint(2 << 3 | 5) + struct.pack("<f", 0.0)  # score: float (fixed32)
             + _varint(3 << 3 | 0) + _varint(_USER_DEFINED))  # type: enum
    out.append(_length_delimited(1, entry))
  return b"".join(out)


class SentencePieceVocabulary(Vocabulary):
  """T5's SentencePiece vocabulary plus `extra_ids` sentinels, as seqio's SentencePieceVocabulary.

  The sentinels take the ids above the model's pieces in reverse: `<extra_id_0>` is the highest id
  (32099 for T5's 32000-piece model), `<extra_id_{extra_ids-1}>` the lowest. As in seqio they are
  added to the model as user-defined pieces `▁<extra_id_N>`, so `<extra_id_N>` written in the text
  maps to its id only at a word start (after a space or at the beginning): "and <extra_id_0>ly" is
  fine, "jel<extra_id_0>" is encoded as plain characters.
  """

  def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100):
    self.model_file = os.fspath(local_path(model_file, "vocabulary"))
    self.extra_ids = int(extra_ids)
    try:
      model_bytes = pathlib.Path(self.model_file).read_bytes()
    except FileNotFoundError:
      raise FileNotFoundError(f"SentencePiece model file not found: {self.model_file}") from None
    except OSError as e:
      raise OSError(f"cannot read SentencePiece model file {self.model_file}: {e}") from e
    # Reversed so that <extra_id_0> gets the highest id, as T5's span corruption expects.
    sentinels = [f"\u2581<extra_id_{i}>" for i in reversed(range(self.extra_ids))]
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      with _LOAD_LOCK:
        self._sp.LoadFromSerializedProto(model_bytes + _user_defined_pieces(sentinels))
    except RuntimeError as e:
      raise ValueError(f"{self.model_file} is not a SentencePiece model: {e}") from None
    if self._sp.pad_id() != PAD_ID:
      warnings.warn(f"{self.model_file}: the model's pad id is {self._sp.pad_id()}; "
                    f"T5 pads with {PAD_ID} and so does this vocabulary", stacklevel=2)
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    _check_text(text)
    try:
      return self._sp.encode(text)
    except RuntimeError:  # pybind11 cannot pass a lone surrogate to C++ (and says so unclearly)
      if any("\ud800" <= c <= "\udfff" for c in text):
        raise _lone_surrogate_error(text) from None
      raise

  def decode(self, ids: Iterable[int]) -> str:
    # As seqio: ids past the vocabulary (the embedding's padding rows) read as unk.
    ids = [i if 0 <= i < self.vocab_size else self.unk_id for i in _as_id_list(ids)]
    return self._sp.decode(_cut_at_eos(ids, self.eos_id))

  def __repr__(self) -> str:
    return f"SentencePieceVocabulary({self.model_file!r}, extra_ids={self.extra_ids})"


# --- Bytes -----------------------------------------------------------------------------------

class ByteVocabulary(Vocabulary):
  """ByT5's vocabulary, as seqio's ByteVocabulary: id = UTF-8 byte + 3 after pad, eos and unk.

  vocab_size is 259 (ByT5 checkpoints pad the embedding to 384 rows). There are no extra ids and
  `<extra_id_N>` in the text is just bytes: ByT5's span corruption reuses the top byte ids as
  sentinels (`sentinel_id`: 258, 257, ... = bytes 0xFF, 0xFE, ...), which decode like any byte.
  """

  _NUM_SPECIAL = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self._NUM_SPECIAL

  def encode(self, text: str) -> list[int]:
    _check_text(text)
    try:
      data = text.encode("utf-8")
    except UnicodeEncodeError:
      raise _lone_surrogate_error(text) from None
    return [b + self._NUM_SPECIAL for b in data]

  def decode(self, ids: Iterable[int]) -> str:
    ids = _cut_at_eos(_as_id_list(ids), self.eos_id)
    data = bytes(i - self._NUM_SPECIAL for i in ids if self._NUM_SPECIAL <= i < self.vocab_size)
    # Bytes that are not valid UTF-8 (a cut-off character, sentinels such as 0xFF) are dropped,
    # as ByT5 does.
    return data.decode("utf-8", errors="ignore")

  def __repr__(self) -> str:
    return "ByteVocabulary()"


# Where a model directory keeps its SentencePiece model: Hugging Face's name, then seqio's.
SENTENCEPIECE_NAMES = ("spiece.model", "sentencepiece.model")
# Files of a Hugging Face model directory that may name its tokenizer's class.
_TOKENIZER_CLASS_FILES = ("tokenizer_config.json", "config.json")


def get_vocabulary(spec: str | os.PathLike | Vocabulary, extra_ids: int = 100) -> Vocabulary:
  """'byte' or 'byt5' -> ByteVocabulary; a SentencePiece .model path -> SentencePieceVocabulary;
  a model directory (Hugging Face's, or seqio's vocabulary folder) -> its spiece.model (or
  sentencepiece.model), or ByteVocabulary when it is a ByT5's."""
  if isinstance(spec, Vocabulary):
    return spec
  name = os.fspath(spec)
  if name.lower() in ("byte", "byt5"):
    return ByteVocabulary()
  path = local_path(name, "vocabulary", advice="copy the .model file to a local path first")
  if path.is_dir():
    return _directory_vocabulary(path, extra_ids)
  if name.endswith(".model") or path.exists():
    return SentencePieceVocabulary(path, extra_ids=extra_ids)
  raise ValueError(f"unknown vocabulary {name!r}: use 'byte' / 'byt5', the path of a "
                   "SentencePiece .model file, or a model directory holding spiece.model")


def _directory_vocabulary(directory: pathlib.Path, extra_ids: int) -> Vocabulary:
  for file_name in SENTENCEPIECE_NAMES:
    if (directory / file_name).is_file():
      return SentencePieceVocabulary(directory / file_name, extra_ids=extra_ids)
  if _tokenizer_class(directory) == "ByT5Tokenizer":
    return ByteVocabulary()
  others = [n for n in ("tokenizer.json", "tokenizer_config.json") if (directory / n).is_file()]
  held = (f"; it holds {' and '.join(others)}, which this library does not read (only "
          "SentencePiece models)" if others else "")
  raise FileNotFoundError(f"vocabulary directory {directory} has no "
                          f"{' or '.join(SENTENCEPIECE_NAMES)}{held}; put the model's "
                          "SentencePiece file there as spiece.model, give its path, or 'byte' "
                          "for ByT5")


def _tokenizer_class(directory: pathlib.Path) -> str | None:
  """The tokenizer class a Hugging Face directory's JSON files name, if any."""
  for file_name in _TOKENIZER_CLASS_FILES:
    try:
      found = json.loads((directory / file_name).read_text()).get("tokenizer_class")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
      continue  # absent or unreadable: the next file, then the refusal, say the rest
    if found:
      return found
  return None
