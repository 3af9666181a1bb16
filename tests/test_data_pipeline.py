"""The batch pipeline: shapes, EOS, padding, truncation counts, seeded shuffling, host rows,
resumable state, eval padding, mixtures; synthetic data. Byte vocabulary (id = byte + 3), so
expected ids are written from the text directly."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt_jax.data import RecordError, get_batches, get_task, synthetic
from softprompt_jax.tokenizers import ByteVocabulary

VOCAB = ByteVocabulary()
EOS = 1


def _ids(text):
  return [b + 3 for b in text.encode("utf-8")]


def _records(n):
  return [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(n)]


def _batches(n=10, split="train", **kwargs):
  options = dict(input_length=24, target_length=10, batch_size=4, seed=0)
  options.update(kwargs)
  return get_batches("glue_sst2", split, VOCAB, source={split: _records(n)}, **options)


def _sentences(batch):
  return [None if ex is None else ex["inputs"] for ex in batch.examples]


def test_arrays_eos_and_teacher_forcing():
  it = _batches(n=3, split="validation", batch_size=3)
  batch = next(it)
  assert set(batch.arrays) == {"encoder_input_tokens", "decoder_input_tokens",
                               "decoder_target_tokens"}
  assert all(a.dtype == np.int32 for a in batch.arrays.values())
  assert batch.arrays["encoder_input_tokens"].shape == (3, 24)
  assert batch.arrays["decoder_target_tokens"].shape == (3, 10)
  text = "sst2 sentence: s0"
  assert batch.arrays["encoder_input_tokens"][0].tolist() == (
      _ids(text) + [EOS] + [0] * (24 - len(text) - 1))
  assert batch.arrays["decoder_target_tokens"][0].tolist() == _ids("negative") + [EOS, 0]
  assert batch.arrays["decoder_input_tokens"][0].tolist() == [0] + _ids("negative") + [EOS]
  assert batch.examples[1]["targets"] == "positive" and batch.examples[1]["record_index"] == 1
  assert batch.mask.tolist() == [True, True, True]


def test_truncation_keeps_eos_and_is_counted():
  records = [{"sentence": "x" * k, "label": 1} for k in (1, 5, 9)]
  it = get_batches("taskless_glue_sst2", "validation", VOCAB, source=records, input_length=16,
                   target_length=4, batch_size=3)
  batch = next(it)
  # Inputs "sentence: " + k x's: 10 + k bytes; 15 fit before EOS: k = 9 is cut.
  assert batch.arrays["encoder_input_tokens"][2].tolist() == _ids("sentence: xxxxx") + [EOS]
  # "positive" (8 bytes) never fits in 3 + EOS.
  assert batch.arrays["decoder_target_tokens"][:, -1].tolist() == [EOS] * 3
  assert (it.stats.num_examples, it.stats.num_truncated_inputs,
          it.stats.num_truncated_targets) == (3, 1, 3)


def test_eval_pass_pads_the_last_batch_with_empty_rows():
  it = _batches(n=10, split="validation")
  assert it.num_batches == 3
  batches = list(it)
  assert len(batches) == 3
  last = batches[-1]
  assert last.mask.tolist() == [True, True, False, False]
  assert last.examples[2:] == [None, None]
  for array in last.arrays.values():
    assert (array[2:] == 0).all()
  seen = [s for b in batches for s in _sentences(b) if s]
  assert seen == [f"sst2 sentence: s{i}" for i in range(10)]  # in order, each once
  assert it.stats.num_examples == 10
  it.reset()
  assert _sentences(next(it)) == _sentences(batches[0])


def test_training_repeats_with_a_new_permutation_each_epoch():
  it = _batches(n=8, batch_size=4)
  epochs = [[s for _ in range(2) for s in _sentences(next(it))] for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(f"sst2 sentence: s{i}" for i in range(8))
  assert epochs[0] != epochs[1] != epochs[2]
  assert epochs[0] != sorted(epochs[0], key=lambda s: int(s.rsplit("s", 1)[1]))  # shuffled


def test_batches_span_epochs_so_every_batch_is_full():
  it = _batches(n=6, batch_size=4)
  batches = [next(it) for _ in range(3)]  # 12 positions = two epochs
  assert all(b.mask.all() for b in batches)
  stream = [s for b in batches for s in _sentences(b)]
  assert sorted(stream[:6]) == sorted(stream[6:])


def test_seed_determines_the_order():
  first = [_sentences(next(_batches(seed=1))) for _ in range(2)]
  assert first[0] == first[1]
  assert _sentences(next(_batches(seed=2))) != first[0]
  unshuffled = _batches(shuffle=False)
  assert _sentences(next(unshuffled)) == [f"sst2 sentence: s{i}" for i in range(4)]


def test_host_rows_partition_the_global_batch():
  full = _batches(n=10, batch_size=8)
  hosts = [_batches(n=10, batch_size=8, rows=slice(2 * h, 2 * h + 2)) for h in range(4)]
  for _ in range(3):
    whole = next(full)
    parts = [next(h) for h in hosts]
    for key, array in whole.arrays.items():
      np.testing.assert_array_equal(np.concatenate([p.arrays[key] for p in parts]), array)
    assert sum((p.examples for p in parts), []) == whole.examples
  assert sum(h.stats.num_examples for h in hosts) == full.stats.num_examples == 24


def test_host_rows_in_eval_padding():
  hosts = [_batches(n=5, split="validation", batch_size=4, rows=(2 * h, 2 * h + 2))
           for h in range(2)]
  counts = [sum(1 for _ in h) for h in hosts]
  assert counts == [2, 2]  # every host runs the same number of steps
  hosts[1].reset()
  next(hosts[1])
  assert next(hosts[1]).mask.tolist() == [False, False]  # positions 6, 7 of 5


def test_state_restore_continues_exactly():
  reference = _batches(n=7, batch_size=3)
  expected = [next(reference) for _ in range(8)]
  it = _batches(n=7, batch_size=3)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.state()))
  assert state == {"seed": 0, "epoch": 2, "index": 1, "position": 15, "num_examples": 7}
  resumed = _batches(n=7, batch_size=3)
  resumed.restore(state)
  for want in expected[5:]:
    got = next(resumed)
    assert got.examples == want.examples
    for key in want.arrays:
      np.testing.assert_array_equal(got.arrays[key], want.arrays[key])
  resumed.restore({"seed": 0, "epoch": 1, "index": 5})  # epoch and index alone suffice
  assert next(resumed).examples == [ex for b in expected for ex in b.examples][12:15]


def test_restore_refuses_another_seed_or_data():
  it = _batches(n=7)
  with pytest.raises(ValueError, match="seed 3"):
    it.restore({"seed": 3, "epoch": 0, "index": 0})
  with pytest.raises(ValueError, match="saved over 9 examples; the data now has 7"):
    it.restore({"seed": 0, "epoch": 0, "index": 0, "num_examples": 9})


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), batch_size=st.integers(1, 5), steps=st.integers(0, 6),
       seed=st.integers(0, 2**31), host=st.integers(0, 4))
def test_property_restore_and_rows(n, batch_size, steps, seed, host):
  rows = slice(min(host, batch_size - 1), batch_size)
  make = lambda: _batches(n=n, batch_size=batch_size, seed=seed, rows=rows)
  reference = make()
  stream = [next(reference).examples for _ in range(steps + 3)]
  it = make()
  for _ in range(steps):
    next(it)
  resumed = make()
  resumed.restore(json.loads(json.dumps(it.state())))
  assert [next(resumed).examples for _ in range(3)] == stream[steps:]


def test_mixture_carries_prompt_ids():
  sources = {"glue_sst2": _records(6),
             "glue_cola": [{"sentence": f"c{i}", "label": 1} for i in range(3)]}
  it = get_batches(["glue_sst2", "glue_cola"], "train", VOCAB, source=sources,
                   input_length=24, target_length=12, batch_size=9, prompt_id=[5, 7])
  batch = next(it)  # one whole epoch of the 9 examples
  tasks = [ex["task"] for ex in batch.examples]
  assert sorted(tasks) == ["glue_cola"] * 3 + ["glue_sst2"] * 6  # proportional to size
  assert batch.arrays["prompt_ids"].tolist() == [5 if t == "glue_sst2" else 7 for t in tasks]
  for ex in batch.examples:
    assert ex["inputs"].startswith("sst2 " if ex["task"] == "glue_sst2" else "cola ")


def test_round_robin_mixture_alternates_tasks():
  sources = [_records(6), [{"sentence": f"c{i}", "label": 1} for i in range(2)]]
  it = get_batches(["glue_sst2", "glue_cola"], "train", VOCAB, source=sources,
                   input_length=24, target_length=12, batch_size=4, mixing="round_robin")
  batches = [next(it) for _ in range(3)]
  ids = [i for b in batches for i in b.arrays["prompt_ids"].tolist()]
  assert ids == [0, 1] * 6
  cola = [ex["inputs"] for b in batches for ex in b.examples if ex["task"] == "glue_cola"]
  assert sorted(cola[:2]) == sorted(cola[2:4]) == ["cola sentence: c0", "cola sentence: c1"]


def test_single_task_prompt_id():
  batch = next(_batches(prompt_id=3))
  assert batch.arrays["prompt_ids"].tolist() == [3, 3, 3, 3]


def test_record_errors_name_the_file_line_and_field(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"sentence": "ok", "label": 0}\n{"text": "oops", "label": 1}\n')
  with pytest.raises(RecordError, match=r"train.jsonl:2: glue_sst2: .*no field 'sentence'"):
    get_batches("glue_sst2", "train", VOCAB, source=tmp_path, input_length=8, target_length=4,
                batch_size=2)


def test_test_split_allows_missing_labels(tmp_path):
  (tmp_path / "test.jsonl").write_text('{"sentence": "no label", "idx": 0}\n')
  batch = next(get_batches("glue_sst2", "test", VOCAB, source=tmp_path, input_length=32,
                           target_length=8, batch_size=1))
  assert batch.examples[0]["targets"] == "<unk>"


def test_argument_errors():
  with pytest.raises(ValueError, match="rows must be a contiguous slice"):
    _batches(rows=slice(2, 6))
  with pytest.raises(ValueError, match="has no built-in data: pass source="):
    get_batches("glue_sst2", "train", VOCAB, input_length=8, target_length=4, batch_size=2)


def test_synthetic_tasks():
  records = synthetic.make_records("reverse", "train", 5, seed=0)
  again = synthetic.make_records("reverse", "train", 5, seed=0)
  other = synthetic.make_records("reverse", "validation", 5, seed=0)
  assert records == again and records != other
  for record in records:
    words = record["text"].split()
    assert record["target"] == " ".join(words[::-1]) and 3 <= len(words) <= 8
  example = get_task("synthetic_reverse").format(
      {"instruction": "reverse the words:", "text": "apple dog cat", "target": "cat dog apple"})
  assert example == {"inputs": "reverse the words: apple dog cat", "targets": "cat dog apple",
                     "idx": None}
  assert get_task("taskless_synthetic_reverse").format(
      {"instruction": "reverse the words:", "text": "apple dog cat",
       "target": "cat dog apple"})["inputs"] == "apple dog cat"
  checks = {"copy": lambda w: " ".join(w), "sort": lambda w: " ".join(sorted(w)),
            "count": lambda w: str(len(w)), "first_word": lambda w: w[0],
            "last_word": lambda w: w[-1]}
  for name, target in checks.items():
    for record in synthetic.make_records(name, "test", 20, seed=3):
      assert record["target"] == target(record["text"].split())


def test_synthetic_sentiment_is_consistent_with_its_lexicon():
  task = get_task("synthetic_sentiment")
  assert task.choices == ("negative", "positive")
  for record in synthetic.make_records("sentiment", "train", 50, seed=1):
    words = set(record["text"].split())
    lexicon = synthetic.POSITIVE if record["label"] else synthetic.NEGATIVE
    assert words & set(lexicon) and not words & set(synthetic.POSITIVE + synthetic.NEGATIVE
                                                    ).difference(lexicon)
    example = task.format(record)
    assert example["inputs"] == f"is this positive or negative: {record['text']}"
    assert example["targets"] == ("positive" if record["label"] else "negative")
  assert task.evaluate([example], [example["targets"]]) == {"accuracy": 100.0}


def test_synthetic_pipeline_sizes_and_splits():
  it = get_batches("synthetic_count", "validation", VOCAB, input_length=64, target_length=4,
                   batch_size=32)
  assert it.num_examples == synthetic.DEFAULT_SIZES["validation"]
  small = get_batches("synthetic_count", "train", VOCAB, input_length=64, target_length=4,
                      batch_size=4, source=synthetic.synthetic_source("count", {"train": 12}))
  assert small.num_examples == 12
  batch = next(small)
  assert get_task("synthetic_count").evaluate(batch.examples, [ex["targets"] for ex in
                                                               batch.examples]) == {
      "exact_match": 100.0}


def test_train_and_eval_entry_points():
  from softprompt_jax.data import pipeline
  train = pipeline.train_batches("glue_sst2", "train", VOCAB, batch_size=4, input_length=24,
                                 target_length=10, seed=0, rows=slice(0, 2),
                                 source={"train": _records(10)})
  arrays = next(train).arrays
  assert isinstance(arrays, dict) and arrays["encoder_input_tokens"].shape == (2, 24)
  assert train.state()["position"] == 4
  evaluation = pipeline.eval_batches("glue_sst2", "validation", VOCAB, batch_size=4,
                                     input_length=24, target_length=10,
                                     source={"validation": _records(10)}, max_examples=5)
  batches = list(evaluation)
  assert [b.mask.sum() for b in batches] == [4, 1]
  assert [ex["inputs"] for b in batches for ex in b.examples if ex] == [
      f"sst2 sentence: s{i}" for i in range(5)]


def test_t5_vocabulary_batches(testdata):
  from softprompt_jax.tokenizers import SentencePieceVocabulary
  vocab = SentencePieceVocabulary(testdata / "t5_vocab" / "sentencepiece.model")
  record = {"premise": "A cat sat.", "hypothesis": "A cat is sitting.", "label": 1}
  batch = next(get_batches("super_glue_rte", "validation", vocab, source=[record],
                           input_length=32, target_length=8, batch_size=2))
  inputs = vocab.encode("rte hypothesis: A cat is sitting. premise: A cat sat.")
  assert batch.arrays["encoder_input_tokens"][0, :len(inputs) + 1].tolist() == inputs + [1]
  assert vocab.decode(batch.arrays["decoder_target_tokens"][0]) == "not_entailment"
  assert batch.mask.tolist() == [True, False]
