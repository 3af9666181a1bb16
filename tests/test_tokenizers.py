"""Vocabularies against independent references.

- transformers' T5Tokenizer (v5: the `tokenizers`-backed one, converted from the local .model
  file; there is no sentencepiece-based T5Tokenizer in transformers 5) and ByT5Tokenizer.
- seqio's recipe for sentinels, rebuilt here with protobuf: parse the ModelProto, add the pieces
  `▁<extra_id_N>` as USER_DEFINED, load the result. The library writes those bytes by hand.

Where transformers and seqio disagree (sentinels not at a word start, unk's surface, spaces
around sentinels when decoding), the library follows seqio, which made T5's training data; the
differences are pinned in `test_known_differences_from_transformers`.
"""

import pathlib
import re
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import sentencepiece

from softprompt_jax.errors import is_user_error
from softprompt_jax.run_setup import load_vocabulary
from softprompt_jax.tokenizers import (ByteVocabulary, SentencePieceVocabulary, get_vocabulary,
                                       pad_batch, sentinel_id)

PLAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How's it going? (Fine) -- yes; no: maybe...",
    "3.14159 is pi; 1,000,000 dollars; 2024-01-31; 42%",
    "café, naïve, résumé, Zürich, São Paulo, Ελληνικά, Москва, 東京",  # some are unk in T5's vocab
    "I ❤️ emoji 😀🎉",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces",
    "line one\nline two\n\nline four\ttab",
    "ﬁ ligature ① ＡＢＣ",  # NFKC: fi, 1, ABC
    "A B\u00a0C\u3000wide",
    "",
    " ",
]
# Sentinels at word starts and followed by a space or the end: seqio and transformers agree.
SENTINEL_TEXTS = [
    "Hello world <extra_id_0> x",
    "<extra_id_0> starts",
    "ends with <extra_id_99>",
    "a <extra_id_17> b <extra_id_0> c <extra_id_99>",
    "question: what? context: <extra_id_3>\n<extra_id_4>",
    "x  <extra_id_2>  y",
    " <extra_id_5> ",
    "<extra_id_100> is not a sentinel",
    "<extra_id_0 is not one either",
]
TEXTS = PLAIN_TEXTS + SENTINEL_TEXTS


@pytest.fixture(scope="module")
def vocab_path(testdata):
  return testdata / "t5_vocab" / "sentencepiece.model"


@pytest.fixture(scope="module")
def vocab(vocab_path):
  return SentencePieceVocabulary(vocab_path)


@pytest.fixture(scope="module")
def hf_t5(vocab_path, tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("google.protobuf", reason="transformers reads the .model only with protobuf")
  # from_pretrained on a local folder: converts spiece.model offline, never touches the hub.
  folder = tmp_path_factory.mktemp("hf_t5")
  shutil.copy(vocab_path, folder / "spiece.model")
  return transformers.T5Tokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def seqio_recipe(vocab_path):
  """A SentencePieceProcessor with sentinels added the way seqio does it, through protobuf."""
  pytest.importorskip("google.protobuf")
  from sentencepiece import sentencepiece_model_pb2 as pb2
  model = pb2.ModelProto.FromString(vocab_path.read_bytes())
  for n in reversed(range(100)):
    model.pieces.add(piece=f"▁<extra_id_{n}>", score=0.0,
                     type=pb2.ModelProto.SentencePiece.USER_DEFINED)
  sp = sentencepiece.SentencePieceProcessor()
  sp.LoadFromSerializedProto(model.SerializeToString())
  return sp


@pytest.fixture(scope="module")
def hf_byt5():
  transformers = pytest.importorskip("transformers")
  return transformers.ByT5Tokenizer()  # needs no files


def _whitespace_normalised(text):
  # T5's normalizer (nmt_nfkc): NFKC, whitespace runs to one space, no leading/trailing space.
  return " ".join(unicodedata.normalize("NFKC", text).split())


# --- SentencePieceVocabulary -------------------------------------------------------------------

def test_fixture_documented_example(vocab):
  assert vocab.encode("Hello world <extra_id_0> x") == [8774, 296, 32099, 3, 226]
  ids = vocab.encode_batch(["Hello world <extra_id_0> x"], max_length=8)
  np.testing.assert_array_equal(ids, [[8774, 296, 32099, 3, 226, 1, 0, 0]])
  assert vocab.decode(ids[0]) == "Hello world <extra_id_0> x"


def test_special_ids_and_sentinels(vocab):
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 32100)
  for n in (0, 1, 17, 98, 99):
    assert vocab.encode(f"<extra_id_{n}>") == [32099 - n]
    assert vocab.decode([32099 - n]) == f"<extra_id_{n}>"
    assert sentinel_id(vocab, n) == 32099 - n
  assert max(vocab.encode("<extra_id_100>")) < 32000  # only 100 sentinels
  small = SentencePieceVocabulary(vocab.model_file, extra_ids=3)
  assert small.vocab_size == 32003
  assert small.encode("a <extra_id_0> <extra_id_2>") == [3, 9, 32002, 32000]
  assert SentencePieceVocabulary(vocab.model_file, extra_ids=0).vocab_size == 32000


def test_same_model_as_seqio_recipe(vocab, seqio_recipe):
  # The hand-written protobuf bytes give the very model seqio builds with protobuf.
  assert vocab._sp.serialized_model_proto() == seqio_recipe.serialized_model_proto()
  for text in TEXTS + ["and <extra_id_0>ly", "jel<extra_id_0> x", "<extra_id_0><extra_id_1>"]:
    assert vocab.encode(text) == seqio_recipe.encode(text), text
    ids = vocab.encode(text)
    assert vocab.decode(ids) == seqio_recipe.decode(ids), text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(vocab, hf_t5, text):
  assert vocab.encode(text) == hf_t5(text, add_special_tokens=False).input_ids
  assert vocab.encode(text) + [vocab.eos_id] == hf_t5(text).input_ids


def test_known_differences_from_transformers(vocab, hf_t5):
  # 1. A sentinel followed directly by a word or punctuation: seqio's piece `▁<extra_id_N>`
  #    leaves the next piece without a word boundary; transformers inserts "▁" (id 3) after it.
  for text, ours, after in [("and <extra_id_0>ly sandwiches", [11, 32099, 120, 20017], 2),
                            ("x <extra_id_5>.", [3, 226, 32094, 5], 3),
                            ("x <extra_id_5>, y", [3, 226, 32094, 6, 3, 63], 3)]:
    assert vocab.encode(text) == ours
    assert hf_t5(text, add_special_tokens=False).input_ids == ours[:after] + [3] + ours[after:]
  # 2. A sentinel not at a word start is plain text for seqio ("<" is unk in T5's vocabulary);
  #    transformers matches it anywhere.
  assert vocab.encode("jel<extra_id_0> x") == [528, 40, 2, 25666, 834, 23, 26, 834, 632, 3155, 3,
                                               226]
  assert hf_t5("jel<extra_id_0> x", add_special_tokens=False).input_ids == [528, 40, 32099, 3, 226]
  assert 32098 not in vocab.encode("<extra_id_0><extra_id_1>")
  # 3. Decoding: sentencepiece keeps the space before a sentinel and writes unk as its
  #    unk_surface " ⁇ " (spaces included); transformers drops that space and writes "<unk>".
  ids = vocab.encode("a <extra_id_17> b ü ï")
  assert vocab.decode(ids) == "a <extra_id_17> b ü  ⁇ "
  assert hf_t5.decode(ids) == "a<extra_id_17> b ü <unk>"


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(vocab, hf_t5, text):
  ids = vocab.encode(text)
  if vocab.unk_id in ids:  # characters T5's vocabulary lacks come back as " ⁇ "
    assert " ⁇ " in f" {vocab.decode(ids)} "
    return
  assert vocab.decode(ids) == _whitespace_normalised(text)
  if not any(i >= 32000 for i in ids):
    assert vocab.decode(ids) == hf_t5.decode(ids, skip_special_tokens=True)


def test_decode_stops_at_eos_drops_pad_and_reads_unknown_ids_as_unk(vocab):
  hello = vocab.encode("Hello world")
  assert vocab.decode(hello + [1] + vocab.encode(" more")) == "Hello world"
  assert vocab.decode([0, *hello, 0, 0]) == "Hello world"
  assert vocab.decode(np.array(hello + [1, 0, 0], np.int32)) == "Hello world"
  assert vocab.decode(i for i in hello) == "Hello world"
  assert vocab.decode([]) == "" and vocab.decode([1, 8774]) == ""
  # Ids of the embedding's padding rows (32100..32127) decode as unk, as in seqio.
  assert vocab.decode([*hello, 32127]) == "Hello world ⁇ "
  with pytest.raises(ValueError, match="decode_batch"):
    vocab.decode(np.zeros((2, 3), np.int32))


def test_encode_batch_and_decode_batch(vocab):
  texts = ["Hello world <extra_id_0> x", "The quick brown fox jumps over the lazy dog.", ""]
  ids = vocab.encode_batch(texts, max_length=32)
  assert ids.dtype == np.int32 and ids.shape == (3, 32)
  assert vocab.decode_batch(ids) == texts
  np.testing.assert_array_equal(ids[2], [1] + [0] * 31)
  no_eos = vocab.encode_batch(texts, max_length=6, add_eos=False)
  np.testing.assert_array_equal(no_eos[0], [8774, 296, 32099, 3, 226, 0])
  with pytest.raises(TypeError, match="encode_batch"):
    vocab.encode(texts)


# --- pad_batch ---------------------------------------------------------------------------------

def test_pad_batch_trims_keeps_eos_and_counts():
  seqs = [[5, 6, 7, 8], [5, 6], [], [5, 6, 7]]
  ids, cut = pad_batch(seqs, 4, eos_id=1)
  np.testing.assert_array_equal(ids, [[5, 6, 7, 1], [5, 6, 1, 0], [1, 0, 0, 0], [5, 6, 7, 1]])
  assert ids.dtype == np.int32 and cut == 1
  ids, cut = pad_batch(seqs, 3)
  np.testing.assert_array_equal(ids, [[5, 6, 7], [5, 6, 0], [0, 0, 0], [5, 6, 7]])
  assert cut == 1
  ids, cut = pad_batch([], 5, eos_id=1)
  assert ids.shape == (0, 5) and cut == 0
  ids, cut = pad_batch(seqs, 1, eos_id=1)  # room for EOS only
  np.testing.assert_array_equal(ids, [[1]] * 4)
  assert cut == 3
  with pytest.raises(ValueError, match="max_length"):
    pad_batch(seqs, 0)


def test_encode_batch_truncation_matches_pad_batch_count(vocab):
  texts = ["The quick brown fox jumps over the lazy dog.", "Hi"]
  ids = vocab.encode_batch(texts, max_length=5)
  np.testing.assert_array_equal(ids[0], vocab.encode(texts[0])[:4] + [1])
  _, cut = pad_batch([vocab.encode(t) for t in texts], 5, eos_id=vocab.eos_id)
  assert cut == 1


# --- ByteVocabulary ----------------------------------------------------------------------------

BYTE_TEXTS = ["plain ascii", "café naïve Zürich", "Ελληνικά Москва 東京 한국어", "emoji 😀🎉❤️",
              "tabs\tand\nnewlines  ", "", "\x00\x7f"]


def test_byte_ids():
  b = ByteVocabulary()
  assert (b.pad_id, b.eos_id, b.unk_id, b.vocab_size) == (0, 1, 2, 259)
  assert b.encode("a") == [ord("a") + 3]
  assert b.encode("é") == [0xC3 + 3, 0xA9 + 3]
  assert b.encode("😀") == [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
  assert b.encode("\x00") == [3] and max(b.encode("\U0010ffff")) <= 258
  # seqio's ByteVocabulary has no sentinel text: "<extra_id_0>" is 12 bytes.
  assert b.encode("<extra_id_0>") == [c + 3 for c in b"<extra_id_0>"]
  assert [sentinel_id(b, n) for n in range(3)] == [258, 257, 256]


@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_byte_round_trip_and_transformers(text, hf_byt5):
  b = ByteVocabulary()
  ids = b.encode(text)
  assert b.decode(ids) == text
  assert ids == hf_byt5(text, add_special_tokens=False).input_ids
  assert ids + [1] == hf_byt5(text).input_ids
  assert b.decode(ids) == hf_byt5.decode(ids)


def test_byte_decode_drops_specials_sentinels_and_invalid_utf8(hf_byt5):
  b = ByteVocabulary()
  e, f = b.encode("e")[0], b.encode("f")[0]
  assert b.decode([0, e, 2, f, 0]) == "ef"                # pad and unk dropped
  assert b.decode([e, 1, f]) == "e"                       # stops at EOS
  assert b.decode([e, 258, 257, f]) == "ef"               # sentinels: bytes 0xFF, 0xFE
  assert b.decode([e, 259, 383, 1000, -1, f]) == "ef"     # past the vocabulary, negative
  cut = b.encode("é")[:1]                                  # half a character
  assert b.decode([e, *cut, f]) == "ef"
  assert b.decode(np.array([e, f, 1, 0], np.int32)) == "ef"
  ids = [e, 258, *cut, f, 2, 0]
  assert b.decode(ids) == hf_byt5.decode(ids, skip_special_tokens=True)
  np.testing.assert_array_equal(b.encode_batch(["é", "efg"], 3),
                                [[0xC3 + 3, 0xA9 + 3, 1], [e, f, 1]])


# --- get_vocabulary and errors -----------------------------------------------------------------

def test_get_vocabulary(vocab_path):
  assert isinstance(get_vocabulary("byte"), ByteVocabulary)
  assert isinstance(get_vocabulary("ByT5"), ByteVocabulary)
  for spec in (vocab_path, str(vocab_path)):
    v = get_vocabulary(spec)
    assert isinstance(v, SentencePieceVocabulary) and v.vocab_size == 32100
  assert get_vocabulary(vocab_path, extra_ids=0).vocab_size == 32000
  b = ByteVocabulary()
  assert get_vocabulary(b) is b
  with pytest.raises(ValueError, match="'t5'.*byte"):
    get_vocabulary("t5")


def test_a_model_directory_is_a_vocabulary(vocab, vocab_path, tmp_path):
  hf_dir = tmp_path / "t5-small"  # as a Hugging Face T5 directory holds it
  hf_dir.mkdir()
  shutil.copy(vocab_path, hf_dir / "spiece.model")
  (hf_dir / "tokenizer_config.json").write_text('{"extra_ids": 100}')
  (hf_dir / "tokenizer.json").write_text("{}")
  for found in (get_vocabulary(hf_dir), load_vocabulary(str(hf_dir))):
    assert isinstance(found, SentencePieceVocabulary)
    assert found.model_file == str(hf_dir / "spiece.model")
    assert found.vocab_size == vocab.vocab_size
    assert found.encode(SENTINEL_TEXTS[3]) == vocab.encode(SENTINEL_TEXTS[3])
  byt5_dir = tmp_path / "byt5-small"
  byt5_dir.mkdir()
  (byt5_dir / "config.json").write_text('{"model_type": "t5", "tokenizer_class": "ByT5Tokenizer"}')
  assert isinstance(get_vocabulary(byt5_dir), ByteVocabulary)


def test_a_model_directory_without_a_sentencepiece_model_is_refused(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"{tmp_path} has no spiece.model or sentencepiece.model; it holds tokenizer.json")) as e:
    load_vocabulary(str(tmp_path))
  assert is_user_error(e.value) and "\n" not in str(e.value)


def test_missing_model_file(tmp_path):
  missing = tmp_path / "nope" / "sentencepiece.model"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    SentencePieceVocabulary(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    get_vocabulary(str(missing))
  with pytest.raises(OSError, match=re.escape(str(tmp_path))):
    SentencePieceVocabulary(tmp_path)


@pytest.mark.parametrize("content", [
    b"", b"this is not a sentencepiece model\n", bytes(range(256)),
    b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",  # a pickle: rejected, never loaded
])
def test_not_a_model_file(tmp_path, content):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(f"{path} is not a SentencePiece model")):
    SentencePieceVocabulary(path)


def test_library_needs_neither_protobuf_nor_transformers(vocab_path):
  # The module alone, by path, so that whatever the package's __init__ imports does not count.
  module = pathlib.Path(__file__).resolve().parents[1] / "softprompt_jax" / "tokenizers.py"
  code = ("import importlib.util, sys; "
          f"spec = importlib.util.spec_from_file_location('tokenizers_alone', {str(module)!r}); "
          "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t); "
          f"v = t.SentencePieceVocabulary({str(vocab_path)!r}); "
          "assert v.encode('a <extra_id_0>') == [3, 9, 32099]; "
          "bad = [m for m in ('google.protobuf', 'transformers', 'torch') if m in sys.modules]; "
          "assert not bad, bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
