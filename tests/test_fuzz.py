"""Property-based tests: any input to the readers, the task formatting and
the tokenizers either works or raises the project's own clear error (DataError, RecordError,
TokenizerInputError), never another exception."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt_jax.data import DataError, RecordError, get_task, list_tasks
from softprompt_jax.data.glue import GLUE_CLASSIFICATION
from softprompt_jax.data.readers import SkipLog, located_records, read_records
from softprompt_jax.data.superglue import SUPER_GLUE_CLASSIFICATION
from softprompt_jax.tokenizers import ByteVocabulary, SentencePieceVocabulary, TokenizerInputError

# No example database: nothing is written into the repository (.hypothesis).
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("fuzz")


# --- Readers ----------------------------------------------------------------------------------

JSON_LINE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8).map(lambda value: json.dumps(value, ensure_ascii=False).encode())
# Lines that are JSON, near-JSON (cut short), bytes and text with tabs, commas and quotes.
LINE = st.one_of(
    JSON_LINE, JSON_LINE.map(lambda line: line[:-1]), st.binary(max_size=20),
    st.text(alphabet=st.sampled_from('ab\t,"\r\\{}[]:é\x00\ufeff '), max_size=20).map(str.encode))
FILE_BYTES = st.one_of(st.binary(max_size=200),
                       st.lists(LINE, max_size=8).map(lambda lines: b"\n".join(lines)))


def _expected_jsonl_lines(data: bytes) -> int:
  """Lines the JSONL reader must yield or report: all but the blank ones."""
  lines = data.split(b"\n")
  if lines[-1] == b"":
    lines.pop()  # the last newline ends a line, it does not start one
  count = 0
  for number, raw in enumerate(lines, start=1):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      count += 1
      continue
    if number == 1:
      text = text.removeprefix("\ufeff")
    count += bool(text.rstrip("\r\n").strip())
  return count


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv", ".csv"])
@FUZZ
@given(data=FILE_BYTES)
def test_readers_yield_dicts_or_raise_data_error(data_dir, suffix, data):
  path = data_dir / f"data{suffix}"
  path.write_bytes(data)
  try:
    records = list(read_records(path))
  except DataError as e:
    assert str(e).startswith(str(path))  # every error names the file
  else:
    assert all(isinstance(r, dict) for r in records)
  # Skipping: bad lines are handed over, the reading goes on; only file faults still raise.
  skipped = SkipLog()
  try:
    located = list(located_records(path, on_bad=skipped))
  except DataError as e:
    assert e.reason == "file"  # a per-line fault is never raised when skipping
    return
  assert all(isinstance(r, dict) and w.startswith(f"{path}:") for w, r in located)
  assert all(m.startswith(f"{path}:") for m in skipped.first)
  if suffix == ".jsonl":
    assert len(located) + skipped.num_skipped == _expected_jsonl_lines(data)


@FUZZ
@given(text=st.text(max_size=100))
def test_text_files_read_or_raise_data_error(data_dir, text):
  for suffix in (".jsonl", ".tsv", ".csv"):
    path = data_dir / f"text{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
      records = list(read_records(path))
    except DataError as e:
      assert str(e).startswith(str(path))
    else:
      assert all(isinstance(r, dict) for r in records)


# --- Task formatting --------------------------------------------------------------------------

FIELD_NAMES = sorted({
    "sentence", "sentence1", "sentence2", "question", "question1", "question2", "hypothesis",
    "premise", "passage", "label", "idx", "choice1", "choice2", "word", "text", "target",
    "instruction", "span1_text", "span1_index", "span2_text", "span2_index", "paragraph",
    "answer", "answers", "query", "entities", "qas", "questions", "start", "end"})
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=5)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats()
    | st.text(max_size=12) | st.sampled_from(["", " ", "0", "1", "-1", "True", "entailment"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=10)


def _valid_record(name: str) -> dict:
  """A record the task `name` (without taskless_) formats, to mutate from."""
  base = name.removeprefix("taskless_")
  if base.startswith("glue_") and base[5:] in GLUE_CLASSIFICATION:
    return {**{f: f"{f} text" for f in GLUE_CLASSIFICATION[base[5:]][1]}, "label": 0, "idx": 1}
  if base == "glue_stsb":
    return {"sentence1": "a b", "sentence2": "c d", "label": 3.2}
  if base == "super_glue_axb":
    return {"sentence1": "a b", "sentence2": "c d", "label": "entailment"}
  if base.startswith("super_glue_") and base[11:] in SUPER_GLUE_CLASSIFICATION:
    return {**{f: f"{f} text" for f in SUPER_GLUE_CLASSIFICATION[base[11:]][1]}, "label": 1}
  if base == "super_glue_multirc":
    return {"idx": 0, "passage": {"text": "P<br>x", "questions": [
        {"question": "Q", "idx": 0, "answers": [{"text": "A", "label": 1, "idx": 0},
                                                {"text": "B", "label": 0, "idx": 1}]}]}}
  if base == "super_glue_record":
    return {"idx": 0, "passage": {"text": "Bob met Ann.\n@highlight\nThey talked",
                                  "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10}]},
            "qas": [{"query": "@placeholder met Ann", "idx": 0, "answers": [{"text": "Bob"}]}]}
  if base == "super_glue_wsc":
    return {"text": "The cat chased the mouse because it was hungry .", "label": True,
            "target": {"span1_text": "The cat", "span1_index": 0, "span2_text": "it",
                       "span2_index": 6}}
  if base.startswith("synthetic_"):
    return {"instruction": "do it:", "text": "apple dog", "target": "dog", "label": 1}
  raise AssertionError(f"no valid record for task {name}: add one")


TASK_NAMES = list_tasks()


def test_every_task_formats_its_valid_record():
  """The fuzzing below starts from these; each must work, or it would test errors only."""
  assert len(TASK_NAMES) > 40
  for name in TASK_NAMES:
    for training in (False, True):
      examples = get_task(name).examples(_valid_record(name), training=training)
      assert examples and all(isinstance(ex["inputs"], str) and isinstance(ex["targets"], str)
                              for ex in examples), name


@st.composite
def task_and_record(draw):
  name = draw(st.sampled_from(TASK_NAMES))
  if draw(st.booleans()):
    record = draw(st.dictionaries(KEYS, JSON_VALUE, max_size=6))
  else:  # a valid record with some fields removed, replaced or added, at any depth
    record = json.loads(json.dumps(_valid_record(name)))
    for _ in range(draw(st.integers(1, 3))):
      target = record
      while isinstance(target, dict) and target and draw(st.booleans()):
        child = target[draw(st.sampled_from(sorted(target)))]
        if isinstance(child, list) and child:
          child = child[0]
        if not isinstance(child, dict):
          break
        target = child
      key = draw(st.sampled_from(sorted(target) or ["label"]) | KEYS)
      if draw(st.booleans()) and key in target:
        del target[key]
      else:
        target[key] = draw(JSON_VALUE)
  return name, record


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=task_and_record(), training=st.booleans(), require_label=st.booleans())
def test_task_formatting_makes_text_examples_or_raises_record_error(case, training,
                                                                    require_label):
  name, record = case
  task = get_task(name)
  try:
    examples = task.examples(record, training=training, require_label=require_label)
  except RecordError as e:
    assert str(e).startswith(f"{name}: ") and "\n" not in str(e).split(": ", 1)[0]
    assert e.reason in ("missing_field", "empty_field", "wrong_type", "unknown_label",
                        "invalid_record", "not_an_object")
    return
  assert isinstance(examples, list)
  for example in examples:
    assert isinstance(example["inputs"], str) and example["inputs"].strip()
    assert isinstance(example["targets"], str)


# --- Tokenizers -------------------------------------------------------------------------------

BYTES = ByteVocabulary()
# Any code point but the surrogates: what a Python str read from a valid file can hold.
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
SURROGATE_TEXT = st.tuples(TEXT, st.characters(categories=["Cs"]), TEXT).map("".join)
IDS = st.lists(st.integers(), max_size=20) | st.lists(st.integers(-5, 300), max_size=40)
ANY_IDS = st.lists(st.integers() | st.floats() | st.none() | st.text(max_size=2)
                   | st.lists(st.integers(), max_size=2), max_size=6)


@FUZZ
@given(text=TEXT)
def test_byte_vocabulary_round_trips_any_text(text):
  ids = BYTES.encode(text)
  assert all(3 <= i < BYTES.vocab_size for i in ids)  # never pad, EOS or unk
  assert BYTES.decode(ids) == text
  assert BYTES.decode(np.array(ids + [BYTES.eos_id, 7], np.int32)) == text  # cut at EOS


@FUZZ
@given(ids=IDS)
def test_byte_vocabulary_decodes_any_ids(ids):
  assert isinstance(BYTES.decode(ids), str)


def _check_decode(vocab, ids):
  """Whole numbers decode (out of range ones as unk or nothing); anything else is an error
  naming the first bad position."""
  bad = [k for k, i in enumerate(ids)
         if not (isinstance(i, int) or isinstance(i, float) and i.is_integer())]
  if not bad:
    assert isinstance(vocab.decode(ids), str)
    return
  with pytest.raises(TokenizerInputError, match=f"^decode: the id at position {bad[0]} is "):
    vocab.decode(ids)


@FUZZ
@given(ids=ANY_IDS)
def test_byte_vocabulary_decode_rejects_what_is_not_an_id(ids):
  _check_decode(BYTES, ids)


@FUZZ
@given(text=SURROGATE_TEXT)
def test_byte_vocabulary_rejects_lone_surrogates(text):
  with pytest.raises(TokenizerInputError, match=r"lone surrogate '\\ud[89a-f][0-9a-f]{2}' at "
                                                r"position \d+"):
    BYTES.encode(text)


@pytest.fixture(scope="module")
def t5_vocab(testdata):
  return SentencePieceVocabulary(testdata / "t5_vocab" / "sentencepiece.model")


@FUZZ
@given(text=TEXT)
def test_sentencepiece_encodes_any_text(t5_vocab, text):
  ids = t5_vocab.encode(text)
  assert all(isinstance(i, int) and 2 <= i < t5_vocab.vocab_size for i in ids)
  assert isinstance(t5_vocab.decode(ids), str)


@FUZZ
@given(ids=IDS)
def test_sentencepiece_decodes_any_int_ids(t5_vocab, ids):
  assert isinstance(t5_vocab.decode(ids), str)


@FUZZ
@given(ids=ANY_IDS)
def test_sentencepiece_decode_rejects_what_is_not_an_id(t5_vocab, ids):
  _check_decode(t5_vocab, ids)


@FUZZ
@given(text=SURROGATE_TEXT)
def test_sentencepiece_rejects_lone_surrogates(t5_vocab, text):
  with pytest.raises(TokenizerInputError, match="lone surrogate"):
    t5_vocab.encode(text)
