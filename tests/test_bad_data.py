"""Bad data end to end: each fault in a file read through the batch pipeline
for a registered task is an error naming file, line and field, or, with bad_records="skip", is
left out and counted in the iterator's Stats (which the trainer writes to summary.json)."""

import dataclasses
import json
import re

import pytest

from softprompt_jax.cli import main
from softprompt_jax.data import DataError, RecordError, get_batches, pipeline
from softprompt_jax.tokenizers import ByteVocabulary

VOCAB = ByteVocabulary()
GOOD = '{"sentence": "a fine film", "label": 1}'
SIZES = dict(batch_size=2, input_length=32, target_length=8)

# (the bad line 2 of a glue_sst2 file, the error type, its message after "file:2: ", reason)
FAULTS = {
    "malformed_json": (b'{"sentence": "x", "label": 0', DataError,
                       "malformed JSON: Expecting ',' delimiter (column 29)", "malformed_json"),
    "invalid_utf8": (b'{"sentence": "caf\xe9", "label": 0}', DataError,
                     "invalid UTF-8 (byte 17 of the line)", "invalid_utf8"),
    "lone_surrogate": (b'{"sentence": "\\ud800", "label": 0}', DataError,
                       "the JSON escape '\\ud800' is half of a UTF-16 surrogate pair",
                       "invalid_utf8"),
    "not_an_object": (b'["a fine film", 1]', DataError,
                      "expected a JSON object per line; got list", "not_an_object"),
    "missing_field": (b'{"text": "a fine film", "label": 1}', RecordError,
                      "glue_sst2: the record has no field 'sentence' (its fields: ['label', "
                      "'text'])", "missing_field"),
    "empty_input": (b'{"sentence": "", "label": 1}', RecordError,
                    "glue_sst2: field 'sentence' is empty; it must hold some text",
                    "empty_field"),
    "whitespace_input": (b'{"sentence": " \\t\\n", "label": 1}', RecordError,
                         "glue_sst2: field 'sentence' is empty (only whitespace)",
                         "empty_field"),
    "wrong_type": (b'{"sentence": ["a", "b"], "label": 1}', RecordError,
                   "glue_sst2: field 'sentence' must be str; got list ['a', 'b']", "wrong_type"),
    "unknown_label": (b'{"sentence": "a fine film", "label": "maybe"}', RecordError,
                      "glue_sst2: field 'label' has the unknown label 'maybe'; expected one of "
                      "['negative', 'positive'] or an index 0..1", "unknown_label"),
    "label_out_of_range": (b'{"sentence": "a fine film", "label": 2}', RecordError,
                           "glue_sst2: field 'label' has the unknown label 2", "unknown_label"),
}


def _write(path, *lines: bytes):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return path


@pytest.fixture(params=sorted(FAULTS))
def fault(request, tmp_path):
  """(name, a train.jsonl whose line 2 holds the fault, error type, message, reason)."""
  line, error, message, reason = FAULTS[request.param]
  path = _write(tmp_path / "train.jsonl", GOOD.encode(), line, GOOD.encode())
  return request.param, path, error, message, reason


def test_each_fault_names_file_and_line_through_train_batches(fault):
  _, path, error, message, _ = fault
  with pytest.raises(error, match="^" + re.escape(f"{path}:2: {message}")) as raised:
    pipeline.train_batches("glue_sst2", "train", VOCAB, source=path.parent, **SIZES)
  assert str(raised.value).endswith("(fix the record, or set bad_records='skip' to leave bad "
                                    "records out and count them)")
  assert "\n" not in str(raised.value)


def test_each_fault_is_skipped_and_counted(fault):
  _, path, _, message, reason = fault
  batches = pipeline.train_batches("glue_sst2", "train", VOCAB, source=path.parent,
                                   bad_records="skip", **SIZES)
  assert batches.num_examples == 2  # lines 1 and 3
  next(batches)
  stats = batches.stats
  assert stats.num_skipped_records == 1
  assert stats.skipped_by_reason == {reason: 1}
  assert len(stats.first_skipped) == 1
  assert stats.first_skipped[0].startswith(f"{path}:2: {message}")
  # What the trainer writes to summary.json under "data".
  data = json.loads(json.dumps(dataclasses.asdict(stats)))
  assert data["num_skipped_records"] == 1 and data["skipped_by_reason"] == {reason: 1}
  assert data["num_examples"] == 2


def test_many_faults_in_one_file_are_counted_by_reason(tmp_path):
  lines = [GOOD.encode()] + [FAULTS[name][0] for name in sorted(FAULTS)] + [GOOD.encode()]
  path = _write(tmp_path / "validation.jsonl", *lines)
  batches = pipeline.eval_batches("glue_sst2", "validation", VOCAB, source=tmp_path,
                                  bad_records="skip", **SIZES)
  assert [ex["inputs"] for b in batches for ex in b.examples if ex] == [
      "sst2 sentence: a fine film"] * 2
  expected = {}
  for name in FAULTS:
    reason = FAULTS[name][3]
    expected[reason] = expected.get(reason, 0) + 1
  assert batches.stats.skipped_by_reason == expected
  assert batches.stats.num_skipped_records == len(FAULTS)
  # The first 10 (reading faults come first: records are formatted once all are read).
  locations = [m.split(": ", 1)[0] for m in batches.stats.first_skipped]
  assert len(locations) == 10
  assert set(locations) <= {f"{path}:{n}" for n in range(2, 2 + len(FAULTS))}


@pytest.mark.parametrize("task, record, message", [
    ("super_glue_rte", {"premise": "  ", "hypothesis": "h", "label": 0},
     "super_glue_rte: field 'premise' is empty (only whitespace)"),
    ("super_glue_boolq", {"passage": "p", "question": "q", "label": "yes"},
     "super_glue_boolq: field 'label' has the unknown label 'yes'; expected one of ['False', "
     "'True']"),
    ("super_glue_multirc", {"passage": {"text": "P", "questions": [
        {"question": "Q", "answers": [{"text": "", "label": 1}]}]}},
     "super_glue_multirc: field 'passage.questions[0].answers[0].text' is empty"),
    ("glue_stsb", {"sentence1": "a", "sentence2": "b", "label": 7.5},
     "glue_stsb: field 'label' must be a similarity score (a number from 0 to 5); got 7.5"),
    ("glue_mnli", {"premise": "p", "hypothesis": "h", "label": "maybe"},
     "glue_mnli: field 'label' has the unknown label 'maybe'; expected one of ['entailment', "
     "'neutral', 'contradiction']"),
    ("synthetic_reverse", {"instruction": "reverse the words:", "text": "", "target": "x"},
     "synthetic_reverse: field 'text' is empty"),
    ("synthetic_sentiment", {"instruction": "i", "text": "good day", "label": "happy"},
     "synthetic_sentiment: field 'label' has the unknown label 'happy'"),
])
def test_record_faults_of_other_tasks(tmp_path, task, record, message):
  path = _write(tmp_path / "validation.jsonl", json.dumps(record).encode())
  with pytest.raises(RecordError, match="^" + re.escape(f"{path}:1: {message}")):
    get_batches(task, "validation", VOCAB, source=tmp_path, **SIZES)


def test_a_generation_target_may_be_empty():
  record = {"instruction": "copy the words:", "text": "apple", "target": ""}
  batch = next(get_batches("synthetic_copy", "validation", VOCAB, source=[record], **SIZES))
  assert batch.examples[0]["targets"] == ""


def test_tsv_faults_name_line_and_skip(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_bytes(b"sentence\tlabel\nok\t0\ncaf\xe9\t1\ntoo\tmany\tcells\n\t1\nfine\t1\n")
  with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid UTF-8 (byte 3 of the line)")):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, **SIZES)
  batches = get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="skip",
                        **SIZES)
  assert batches.num_examples == 2
  assert batches.stats.skipped_by_reason == {"invalid_utf8": 1, "field_count": 1,
                                             "empty_field": 1}
  assert batches.stats.first_skipped[2] == (f"{path}:5: glue_sst2: field 'sentence' is empty; "
                                            "it must hold some text")


def test_csv_invalid_utf8_names_line_and_column(tmp_path):
  path = tmp_path / "train.csv"
  path.write_bytes(b'sentence,label\n"two\nlines",0\nbad \xff byte,1\nfine,1\n')
  with pytest.raises(DataError, match=re.escape(f"{path}:4: invalid UTF-8 in field 'sentence'")):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, **SIZES)
  batches = get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="skip",
                        **SIZES)
  assert batches.num_examples == 2 and batches.stats.skipped_by_reason == {"invalid_utf8": 1}


def test_a_bad_header_is_never_skipped(tmp_path):
  (tmp_path / "train.tsv").write_bytes(b"sent\xffence\tlabel\nok\t0\n")
  with pytest.raises(DataError, match=r"train.tsv:1: invalid UTF-8"):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="skip", **SIZES)


def test_records_that_are_not_dicts_in_a_list_source():
  with pytest.raises(DataError, match=r"^record 1: a record must be a dict; got str"):
    get_batches("glue_sst2", "validation", VOCAB, source=[json.loads(GOOD), "x"], **SIZES)
  batches = get_batches("glue_sst2", "validation", VOCAB, source=[json.loads(GOOD), "x"],
                        bad_records="skip", **SIZES)
  assert batches.num_examples == 1 and batches.stats.skipped_by_reason == {"not_an_object": 1}


def test_nothing_left_after_skipping_is_a_clear_error(tmp_path):
  path = _write(tmp_path / "train.jsonl", b"{", b'{"sentence": ""}')
  with pytest.raises(DataError, match=re.escape(
      f"glue_sst2: split 'train' has no examples in {tmp_path} (2 bad records skipped; first: "
      f"{path}:1: malformed JSON")):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="skip", **SIZES)


def test_bad_option_value_is_a_clear_error(tmp_path):
  _write(tmp_path / "train.jsonl", GOOD.encode())
  with pytest.raises(ValueError, match=r"bad_records must be 'error' .* or 'skip' .*; got "
                                       r"'ignore'"):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="ignore", **SIZES)


def test_the_default_is_error(tmp_path):
  _write(tmp_path / "train.jsonl", GOOD.encode(), b"{")
  with pytest.raises(DataError, match="train.jsonl:2: malformed JSON"):
    pipeline.train_batches("glue_sst2", "train", VOCAB, source=tmp_path, **SIZES)


def test_long_inputs_are_truncated_and_counted(tmp_path):
  _write(tmp_path / "validation.jsonl", GOOD.encode(),
         json.dumps({"sentence": "long " * 20, "label": 0}).encode())
  batches = pipeline.eval_batches("glue_sst2", "validation", VOCAB, source=tmp_path,
                                  batch_size=2, input_length=32, target_length=4)
  batch = next(batches)
  assert batch.arrays["encoder_input_tokens"][1, -1] == VOCAB.eos_id  # cut, EOS kept
  data = dataclasses.asdict(batches.stats)
  assert (data["num_truncated_inputs"], data["num_truncated_targets"]) == (1, 2)


# --- Through the trainer: the gin binding and summary.json ------------------------------------

def _sentiment(text, label):
  return json.dumps({"text": text, "label": label}).encode()


def test_train_skips_bad_records_and_reports_them_in_the_summary(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  # Long (over 63 bytes: cut at smoke.gin's input length, so that the run's programs are the
  # smoke run's, compiled once for the session) and short texts.
  good = [_sentiment(f"{w} happy day, sun on the trees and flowers, birds singing all day long",
                     1) for w in ("great", "nice", "lovely")] + [
      _sentiment(f"{w} rainy day", 0) for w in ("awful", "sad")]
  _write(data / "train.jsonl", *good[:2], b'{"text": "broken', _sentiment("   ", 1),
         *good[2:], _sentiment("ok day", "so-so"))
  _write(data / "validation.jsonl", *good, b"\xff")
  run = tmp_path / "run"
  argv = ["train", "--gin_file", "runs/smoke.gin", "--model_dir", str(run),
          f"--gin.DATA='{data}'", "--gin.train.num_steps=2", "--gin.train.eval_every=2",
          "--gin.train.batch_size=8", "--gin.train.eval_max_examples=4",
          "--gin.train.log_every=1"]
  assert main(argv) == 2  # the default: the first bad record stops the run, in one line
  assert f"error: {data / 'train.jsonl'}:3: malformed JSON" in capsys.readouterr().err
  assert main(argv + ["--gin.train.bad_records='skip'"]) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["data"]["num_skipped_records"] == 3
  assert summary["data"]["skipped_by_reason"] == {"malformed_json": 1, "empty_field": 1,
                                                  "unknown_label": 1}
  assert summary["data"]["first_skipped"][1].startswith(
      f"{data / 'train.jsonl'}:4: taskless_synthetic_sentiment: field 'text' is empty")
  # 2 steps x 8 rows; inputs over 63 bytes (the happy ones) are cut.
  assert summary["data"]["num_examples"] == 16
  assert 3 <= summary["data"]["num_truncated_inputs"] < 16
  assert summary["final_eval"]["num_examples"] == 4.0
  # The eval counts its cuts as training does: 3 of the first 4 validation texts are too long.
  assert (summary["final_eval"]["num_truncated_inputs"],
          summary["final_eval"]["num_truncated_targets"]) == (3.0, 0.0)

  # `eval` reads the validation file the same way: stop in one line, or skip and count.
  evaluate = ["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
              "--model_dir", str(run), f"--gin.DATA='{data}'",
              "--gin.TASK='taskless_synthetic_sentiment'", "--gin.evaluate.input_length=64",
              "--gin.evaluate.target_length=10"]
  capsys.readouterr()
  assert main(evaluate) == 2
  assert f"error: {data / 'validation.jsonl'}:6: invalid UTF-8" in capsys.readouterr().err
  assert main(evaluate + ["--gin.evaluate.bad_records='skip'"]) == 0
  evaluated = json.loads((run / "eval_validation.json").read_text())
  assert evaluated["metrics"]["num_skipped_records"] == 1.0
  assert evaluated["metrics"]["num_examples"] == 5.0
