"""GLUE tasks: T5's text-to-text strings, written out by hand from `t5.data.preprocessors.glue`
and `stsb` (benchmark name, then "field: text" per field in sorted order, single spaces), on
records with the TFDS / Hugging Face field names; postprocessors, metrics, the registry."""

import pytest

from softprompt_jax import data
from softprompt_jax.data import RecordError, get_task

# (task, record, inputs, targets), every GLUE task.
CASES = [
    ("glue_cola", {"sentence": "The book was read by me.", "label": 1, "idx": 0},
     "cola sentence: The book was read by me.", "acceptable"),
    ("glue_cola", {"sentence": "Book the was.", "label": 0, "idx": 1},
     "cola sentence: Book the was.", "unacceptable"),
    ("glue_sst2", {"sentence": "a gorgeous , witty film", "label": 1, "idx": 2},
     "sst2 sentence: a gorgeous , witty film", "positive"),
    ("glue_sst2", {"sentence": "dull", "label": 0, "idx": 3}, "sst2 sentence: dull", "negative"),
    ("glue_mrpc", {"sentence1": "He left early.", "sentence2": "He went away early.",
                   "label": 1, "idx": 4},
     "mrpc sentence1: He left early. sentence2: He went away early.", "equivalent"),
    ("glue_qqp", {"question1": "Why do I easily get bored of my friends?",
                  "question2": "Why do I get bored of friends so quickly?", "label": 1, "idx": 10},
     "qqp question1: Why do I easily get bored of my friends? question2: Why do I get bored of "
     "friends so quickly?", "duplicate"),
    ("glue_qqp", {"question1": "A?", "question2": "B?", "label": 0, "idx": 11},
     "qqp question1: A? question2: B?", "not_duplicate"),
    ("glue_stsb", {"sentence1": "Three more US soldiers killed in Afghanistan",
                   "sentence2": "NATO Soldier Killed in Afghanistan", "label": 1.8, "idx": 5},
     "stsb sentence1: Three more US soldiers killed in Afghanistan sentence2: NATO Soldier "
     "Killed in Afghanistan", "1.8"),
    # MNLI's fields sorted: hypothesis before premise.
    ("glue_mnli", {"premise": "A man eats.", "hypothesis": "A person eats.", "label": 0, "idx": 6},
     "mnli hypothesis: A person eats. premise: A man eats.", "entailment"),
    ("glue_mnli", {"premise": "A man eats.", "hypothesis": "Nobody eats.", "label": 2, "idx": 7},
     "mnli hypothesis: Nobody eats. premise: A man eats.", "contradiction"),
    ("glue_mnli_matched", {"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 8},
     "mnli hypothesis: H. premise: P.", "neutral"),
    ("glue_mnli_mismatched", {"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 8},
     "mnli hypothesis: H. premise: P.", "neutral"),
    ("glue_qnli", {"question": "Who wrote it?", "sentence": "Tolstoy wrote it.", "label": 0,
                   "idx": 9},
     "qnli question: Who wrote it? sentence: Tolstoy wrote it.", "entailment"),
    ("glue_rte", {"sentence1": "A cat sat on the mat.", "sentence2": "A dog sat.", "label": 1,
                  "idx": 12},
     "rte sentence1: A cat sat on the mat. sentence2: A dog sat.", "not_entailment"),
    # WNLI's label order is the reverse of RTE's.
    ("glue_wnli", {"sentence1": "The fish ate the worm. It was tasty.",
                   "sentence2": "The worm was tasty.", "label": 1, "idx": 13},
     "wnli sentence1: The fish ate the worm. It was tasty. sentence2: The worm was tasty.",
     "entailment"),
    # The diagnostic set reads as MNLI.
    ("glue_ax", {"premise": "The cat sat.", "hypothesis": "The cat did not sit.", "label": 2,
                 "idx": 14},
     "mnli hypothesis: The cat did not sit. premise: The cat sat.", "contradiction"),
]


@pytest.mark.parametrize("name, record, inputs, targets", CASES,
                         ids=[f"{c[0]}-{c[1]['idx']}" for c in CASES])
def test_t5_format(name, record, inputs, targets):
  example = get_task(name).format(record)
  assert example["inputs"] == inputs
  assert example["targets"] == targets
  assert example["idx"] == record["idx"]


@pytest.mark.parametrize("name, record, inputs, targets", CASES,
                         ids=[f"{c[0]}-{c[1]['idx']}" for c in CASES])
def test_taskless_drops_only_the_benchmark_name(name, record, inputs, targets):
  example = get_task(f"taskless_{name}").format(record)
  assert example["inputs"] == inputs.split(" ", 1)[1]
  assert example["targets"] == targets


def test_taskless_inputs_written_out():
  record = {"sentence": "a gorgeous , witty film", "label": 1}
  assert get_task("taskless_glue_sst2").format(record)["inputs"] == (
      "sentence: a gorgeous , witty film")
  record = {"premise": "A man eats.", "hypothesis": "A person eats.", "label": 0}
  assert get_task("taskless_glue_mnli").format(record)["inputs"] == (
      "hypothesis: A person eats. premise: A man eats.")


def test_text_is_used_verbatim():
  # T5 joins with single spaces but leaves the texts' own spacing alone.
  example = get_task("glue_sst2").format({"sentence": "  two  spaces ", "label": 0})
  assert example["inputs"] == "sst2 sentence:   two  spaces "


@pytest.mark.parametrize("label, target", [
    (0.0, "0.0"), (5.0, "5.0"), (3.17, "3.2"), (2.13, "2.2"), (2.1, "2.0"),
    (0.5, "0.4"),   # 2.5 rounds half to even, as tf.round: 2 -> 0.4 (2.1: 10.5 -> 10)
    (2.5, "2.4"),   # 12.5 -> 12
    (4.9, "4.8"),   # float32(4.9) * 5 is exactly 24.5 in float32 -> 24
    ("3.4", "3.4"),  # a TSV cell
])
def test_stsb_target_is_rounded_to_a_fifth_like_t5(label, target):
  record = {"sentence1": "a", "sentence2": "b", "label": label}
  assert get_task("glue_stsb").format(record)["targets"] == target


def test_labels_as_names_digit_strings_and_unlabeled():
  sst2 = get_task("glue_sst2")
  for label in (1, "positive", "1", True):
    assert sst2.format({"sentence": "x", "label": label})["targets"] == "positive"
  # Test splits: label -1 (TFDS / HF) or absent when allowed -> T5's "<unk>".
  assert sst2.format({"sentence": "x", "label": -1})["targets"] == "<unk>"
  assert sst2.examples({"sentence": "x"}, require_label=False)[0]["targets"] == "<unk>"


def test_errors_name_the_field():
  with pytest.raises(RecordError, match=r"glue_mrpc: .*'sentence2'.*fields: \['label', "
                                        r"'sentence1'\]"):
    get_task("glue_mrpc").format({"sentence1": "a", "label": 0})
  with pytest.raises(RecordError, match=r"'label' has the unknown label 'maybe'.*'negative', "
                                        r"'positive'"):
    get_task("glue_sst2").format({"sentence": "x", "label": "maybe"})
  with pytest.raises(RecordError, match="'label' has the unknown label 3"):
    get_task("glue_rte").format({"sentence1": "a", "sentence2": "b", "label": 3})
  with pytest.raises(RecordError, match="no field 'label'"):
    get_task("glue_sst2").format({"sentence": "x"})
  with pytest.raises(RecordError, match="'sentence' must be str; got int"):
    get_task("glue_cola").format({"sentence": 7, "label": 0})
  with pytest.raises(RecordError, match="similarity score"):
    get_task("glue_stsb").format({"sentence1": "a", "sentence2": "b", "label": "high"})


def test_postprocessors():
  sst2 = get_task("glue_sst2")
  assert [sst2.postprocess(t) for t in ("negative", "positive", "Positive", "")] == [0, 1, -1, -1]
  mnli = get_task("glue_mnli")
  assert [mnli.postprocess(t) for t in ("entailment", "neutral", "contradiction")] == [0, 1, 2]
  stsb = get_task("glue_stsb")
  assert stsb.postprocess("3.4") == 3.4 and stsb.postprocess("three") == -1.0


def test_choices_are_the_label_names():
  assert get_task("glue_sst2").choices == ("negative", "positive")
  assert get_task("glue_wnli").choices == ("not_entailment", "entailment")
  assert get_task("taskless_glue_mnli").choices == ("entailment", "neutral", "contradiction")
  assert get_task("glue_stsb").choices is None


@pytest.mark.parametrize("name, keys", [
    ("glue_cola", {"matthews_corrcoef"}), ("glue_sst2", {"accuracy"}),
    ("glue_mrpc", {"f1", "accuracy"}), ("glue_qqp", {"f1", "accuracy"}),
    ("glue_stsb", {"pearson_corrcoef", "spearman_corrcoef"}), ("glue_mnli", {"accuracy"}),
    ("glue_qnli", {"accuracy"}), ("glue_rte", {"accuracy"}), ("glue_wnli", {"accuracy"}),
])
def test_metric_names_are_t5s(name, keys):
  task = get_task(name)
  targets, predictions = [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]
  assert set(task.compute_metrics(targets, predictions)) == keys


def test_evaluate_postprocesses_targets_and_predictions():
  task = get_task("glue_mrpc")
  examples = [task.format({"sentence1": "a", "sentence2": "b", "label": label})
              for label in (1, 0, 1, 1)]
  scores = task.evaluate(examples, ["equivalent", "not_equivalent", "garbage", "equivalent"])
  # "garbage" -> -1 -> wrong: accuracy 3/4; F1 of class 1: tp=2 fp=0 fn=1 -> 0.8.
  assert scores["accuracy"] == pytest.approx(75.0)
  assert scores["f1"] == pytest.approx(80.0)


def test_registry():
  names = data.list_tasks("glue_")
  assert {"glue_cola", "glue_sst2", "glue_mrpc", "glue_qqp", "glue_stsb", "glue_mnli",
          "glue_mnli_matched", "glue_mnli_mismatched", "glue_qnli", "glue_rte", "glue_wnli",
          "glue_ax"} == set(names)
  assert get_task("glue_sst2_v002") is get_task("glue_sst2")  # T5's versioned names
  with pytest.raises(KeyError) as error:
    get_task("glue_sst")
  message = str(error.value)
  assert "\n" not in message and "glue_sst2" in message and "list_tasks()" in message
  with pytest.raises(ValueError, match="already registered"):
    data.register_task(get_task("glue_sst2"))


def test_register_a_custom_task():
  def upper(record, **_):
    return [{"inputs": record["text"], "targets": record["text"].upper()}]
  task = data.Task(name="test_custom_upper", preprocessor=upper)
  data.register_task(task, overwrite=True)
  assert get_task("test_custom_upper").format({"text": "ab"}) == {"inputs": "ab", "targets": "AB"}
  assert data.taskless(task).format({"text": "x y"})["inputs"] == "y"


def _dummy_scores(name):
  """Postprocessed (targets, predictions) of the right kind for task `name`."""
  if "multirc" in name:
    return ([{"value": 1, "group": 0}, {"value": 0, "group": 0}, {"value": 1, "group": 1}],
            [{"value": 1}, {"value": 1}, {"value": 0}])
  if "record" in name:
    return [{"value": ["a b"], "group": 0}], [{"value": "a"}]
  if "stsb" in name:
    return [1.0, 2.0, 3.0], [1.0, 2.5, 2.0]
  if "synthetic" in name and "sentiment" not in name:
    return ["a b", "c"], ["a b", "d"]
  return [0, 1, 1, 0], [0, 1, 0, 0]


def test_metric_names_match_the_computed_keys_for_every_task():
  builtin = [n for n in data.list_tasks() if not n.startswith("test_")]
  assert len(builtin) == 2 * (12 + 10 + 7)  # GLUE, SuperGLUE, synthetic; each also taskless
  for name in builtin:
    task = get_task(name)
    assert task.metric_names, name
    assert tuple(task.compute_metrics(*_dummy_scores(name))) == task.metric_names, name
