"""Issue 13, points 5, 7, 8: every split a run uses is checked before its first step (and the
run directory is left as it was found); duplicate JSON keys and header columns are bad data,
not silent choices; evaluation counts its truncated examples; evaluation and inference show
their progress on stderr (the terminal drawing is tested in test_progress.py)."""

import io
import json
import re

import numpy as np
import pytest

from softprompt_jax import evaluation, inference, progress, run_setup
from softprompt_jax.cli import main
from softprompt_jax.data import DataError, RecordError, cache, check_splits, get_batches, pipeline
from softprompt_jax.tokenizers import ByteVocabulary

VOCAB = ByteVocabulary()
SIZES = dict(batch_size=2, input_length=32, target_length=8)
TASK = "taskless_synthetic_sentiment"  # the smoke run's task: records {"text", "label"}


@pytest.fixture(autouse=True)
def _fresh_cache():
  cache.clear()
  yield
  cache.clear()


def _sentiment(text, label=1):
  return json.dumps({"text": text, "label": label})


def _write(path, *lines):
  path.write_text("".join(line + "\n" for line in lines))
  return path


class TtyStream(io.StringIO):
  def isatty(self):
    return True


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


# --- Point 7: duplicate keys and columns ------------------------------------------------------

@pytest.mark.parametrize("line, key", [
    ('{"sentence": "a fine film", "label": 1, "sentence": "a dull film"}', "sentence"),
    ('{"sentence": "a fine film", "label": 1, "meta": {"id": 1, "id": 2}}', "id"),
])
def test_a_duplicate_json_key_is_a_bad_record(tmp_path, line, key):
  good = '{"sentence": "a good film", "label": 1}'
  path = _write(tmp_path / "train.jsonl", good, line, good)
  with pytest.raises(DataError, match="^" + re.escape(
      f"{path}:2: the key {key!r} appears twice in one JSON object")) as raised:
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, **SIZES)
  assert "bad_records='skip'" in str(raised.value)
  batches = get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records="skip",
                        **SIZES)
  assert batches.num_examples == 2
  assert batches.stats.skipped_by_reason == {"duplicate_key": 1}
  assert batches.stats.first_skipped[0].startswith(f"{path}:2: the key {key!r}")


@pytest.mark.parametrize("name, content", [
    ("train.tsv", "sentence\tlabel\tsentence\nfine\t1\tdull\n"),
    ("train.csv", "sentence,label,sentence\nfine,1,dull\n"),
])
def test_a_column_named_twice_fails_the_file_even_when_skipping(tmp_path, name, content):
  (tmp_path / name).write_text(content)
  for bad_records in ("error", "skip"):
    with pytest.raises(DataError, match=re.escape(
        f"{tmp_path / name}:1: the column 'sentence' appears twice in the header")):
      get_batches("glue_sst2", "train", VOCAB, source=tmp_path, bad_records=bad_records,
                  **SIZES)


def test_unnamed_columns_may_repeat(tmp_path):
  (tmp_path / "train.tsv").write_text("sentence\tlabel\t\t\nfine film\t1\t\t\n")
  assert get_batches("glue_sst2", "train", VOCAB, source=tmp_path, **SIZES).num_examples == 1


# --- Point 7: truncated evaluation examples are counted ----------------------------------------

def _fake_setup(task=TASK):
  from softprompt_jax.data import get_task
  return run_setup.Setup(task=get_task(task), vocabulary=VOCAB, partitioner=None, config=None,
                       model=None, params=None, labels=None)


def test_eval_counts_truncated_inputs_and_targets(tmp_path, monkeypatch):
  # 3 records; inputs of 12+ bytes do not fit input_length 12 (11 bytes + EOS), and the
  # 8-byte targets "positive" / "negative" do not fit target_length 6.
  _write(tmp_path / "validation.jsonl", _sentiment("short day", 1),
         _sentiment("a rather long sunny day", 1), _sentiment("sad rainy day", 0))
  monkeypatch.setattr(evaluation, "predict", lambda model, params, task, arrays, *a, **k:
                      ["positive"] * len(arrays["encoder_input_tokens"]))
  metrics = evaluation.run_eval(_fake_setup(), None, "validation", data_source=tmp_path,
                                batch_size=2, input_length=12, target_length=6, max_examples=None)
  assert metrics["num_examples"] == 3.0
  assert metrics["num_truncated_inputs"] == 2.0
  assert metrics["num_truncated_targets"] == 3.0
  metrics = evaluation.run_eval(_fake_setup(), None, "validation", data_source=tmp_path,
                                batch_size=2, input_length=32, target_length=9, max_examples=None)
  assert (metrics["num_truncated_inputs"], metrics["num_truncated_targets"]) == (0.0, 0.0)


# --- Point 5: every split checked before training -----------------------------------------------

def test_check_splits_reads_train_and_eval_splits_as_the_run_will(tmp_path):
  _write(tmp_path / "train.jsonl", _sentiment("great day"), _sentiment("sad day", 0))
  validation = _write(tmp_path / "validation.jsonl", _sentiment("nice day"),
                      _sentiment("fine day", "so-so"))
  with pytest.raises(RecordError, match="^" + re.escape(
      f"{validation}:2: {TASK}: field 'label' has the unknown label 'so-so'")):
    check_splits(TASK, tmp_path)
  assert check_splits(TASK, tmp_path, bad_records="skip") == {"train": 2, "validation": 1}
  # A test split's labels are not required; a record without one is no error there.
  _write(tmp_path / "test.jsonl", json.dumps({"text": "odd day"}))
  assert check_splits(TASK, tmp_path, evals=("test",)) == {"train": 2, "test": 1}


def test_an_empty_eval_split_is_named(tmp_path):
  _write(tmp_path / "train.jsonl", _sentiment("great day"))
  (tmp_path / "validation.jsonl").write_text("")
  with pytest.raises(DataError, match="^" + re.escape(
      f"{TASK}: split 'validation' has no examples in {tmp_path}")):
    check_splits(TASK, tmp_path)


def test_a_split_is_read_once_and_again_when_its_file_changes(tmp_path, monkeypatch):
  reads = []
  load_split = pipeline.load_split
  monkeypatch.setattr(pipeline, "load_split", lambda *a, **k: reads.append(a[1]) or
                      load_split(*a, **k))
  _write(tmp_path / "train.jsonl", _sentiment("great day"), "{broken")
  validation = _write(tmp_path / "validation.jsonl", _sentiment("nice day"))
  assert check_splits(TASK, tmp_path, bad_records="skip") == {"train": 1, "validation": 1}
  train = pipeline.train_batches(TASK, "train", VOCAB, source=tmp_path, bad_records="skip",
                                 **SIZES)
  for _ in range(2):  # each evaluation of a run
    pipeline.eval_batches(TASK, "validation", VOCAB, source=tmp_path, bad_records="skip",
                          **SIZES)
  assert reads == ["train", "validation"]
  assert train.stats.skipped_by_reason == {"malformed_json": 1}  # counted from the cache too
  # Rewritten at once with as many bytes: read again.
  _write(validation, _sentiment("nice dog"))
  assert next(pipeline.eval_batches(TASK, "validation", VOCAB, source=tmp_path,
                                    **SIZES)).examples[0]["inputs"] == "nice dog"
  assert reads == ["train", "validation", "validation"]


@pytest.fixture
def no_loading(monkeypatch):
  """Loading the frozen model, building the sharded steps or opening checkpoints fails the
  test: the data error must come before them."""
  for target in ("softprompt_jax.run_setup.load_frozen", "softprompt_jax.model_spec.load_frozen",
                 "softprompt_jax.train_step.sharded_steps",
                 "softprompt_jax.training_loop.PromptCheckpoints"):
    def fail(*args, target=target, **kwargs):
      raise AssertionError(f"{target} was called before the data error")
    monkeypatch.setattr(target, fail)


def _train_argv(run, data):
  return ["train", "--gin_file", "runs/smoke.gin", "--model_dir", str(run),
          f"--gin.DATA='{data}'"]


def _listing(directory):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("validation, message", [
    ([_sentiment("nice day"), '{"text": "odd day", "label": 1, "text": "even day"}'],
     "validation.jsonl:2: the key 'text' appears twice in one JSON object"),
    ([_sentiment("nice day"), _sentiment("   ")],
     f"validation.jsonl:2: {TASK}: field 'text' is empty"),
    ([], f"{TASK}: split 'validation' has no examples in "),
])
def test_train_with_bad_eval_data_fails_before_loading_and_leaves_the_directory(
    tmp_path, capsys, no_loading, validation, message):
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "train.jsonl", _sentiment("great day"), _sentiment("sad day", 0))
  (data / "validation.jsonl").write_text("".join(line + "\n" for line in validation))
  fresh = tmp_path / "fresh_run"
  assert main(_train_argv(fresh, data)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("softprompt-jax train: error: ") and "\n" not in err
  assert message in err
  assert not fresh.exists()  # no checkpoints/, no config.gin, no directory

  existing = tmp_path / "existing_run"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  before = _listing(existing)
  assert main(_train_argv(existing, data)) == 2
  assert message in capsys.readouterr().err
  assert _listing(existing) == before


# --- Point 8: progress ------------------------------------------------------------------------

def test_progress_elsewhere_is_plain_throttled_lines_and_nothing_for_a_short_pass():
  clock, stream = FakeClock(), io.StringIO()
  with progress.Progress("eval validation", 100, stream=stream, clock=clock,
                         enabled=True) as shown:
    for done in range(10, 101, 10):
      clock.now += 3.0
      shown.update(done)
  lines = stream.getvalue().splitlines()
  assert [line.split(" |")[0] for line in lines] == [
      "eval validation: 40/100 examples (40%)", "eval validation: 80/100 examples (80%)",
      "eval validation: 100/100 examples (100%)"]  # every 10 s, and the end
  assert lines[-1].endswith("| in 30s") and "\r" not in stream.getvalue()

  quick = io.StringIO()
  with progress.Progress("eval validation", 100, stream=quick, clock=clock, enabled=True) as p:
    clock.now += 2.0
    p.update(100)
  assert quick.getvalue() == ""


def test_progress_is_shown_by_process_0_only(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("softprompt_jax.partitioning.is_primary_process", lambda: False)
  with progress.Progress("infer", 10, stream=stream, update_every_s=0) as shown:
    shown.update(5)
  assert stream.getvalue() == ""


def test_eval_and_infer_show_progress_on_stderr_never_stdout(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
  _write(tmp_path / "validation.jsonl", *[_sentiment(f"day {i}") for i in range(5)])
  monkeypatch.setattr(evaluation, "predict", lambda model, params, task, arrays, *a, **k:
                      ["positive"] * len(arrays["encoder_input_tokens"]))
  evaluation.run_eval(_fake_setup(), None, "validation", data_source=tmp_path, batch_size=2,
                      input_length=16, target_length=9, max_examples=None)
  monkeypatch.setattr(inference, "decode_in_batches", lambda net, params, tokens, *,
                      batch_size, target_length, prompt_ids_N:
                      np.full((len(tokens), target_length), 3 + ord("x"), np.int32))
  rows = [{"task": TASK, "inputs": f"day {i}"} for i in range(5)]
  texts = inference._decode_requests(None, None, rows, [TASK], VOCAB, 2, 16, 4)
  assert texts == ["xxxx"] * 5
  out, err = capsys.readouterr()
  assert out == ""
  assert re.findall(r"^eval validation: (\d)/5 examples", err, re.M)[-1] == "5"
  assert re.findall(r"^infer: (\d)/5 examples", err, re.M) == ["2", "4", "5"]


