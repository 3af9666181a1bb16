"""SuperGLUE tasks on handmade records in the official JSONL schemas (and the flat TFDS / HF
layout where it differs); expected strings written out by hand from T5's preprocessors:
`glue()` (fields sorted), `multirc` via glue() with (question, answer, paragraph), `record`,
`wsc_simple`; the axb rename to premise/hypothesis; taskless variants; postprocessors."""

import pytest

from softprompt_jax.data import RecordError, get_task

RTE_RECORD = {"premise": "A cat sat.", "hypothesis": "A cat is sitting.", "label": 0, "idx": 3}

CASES = [
    ("super_glue_rte", RTE_RECORD, "rte hypothesis: A cat is sitting. premise: A cat sat.",
     "entailment"),
    ("super_glue_rte", {"premise": "A cat sat.", "hypothesis": "A dog sat.",
                        "label": "not_entailment", "idx": 4},
     "rte hypothesis: A dog sat. premise: A cat sat.", "not_entailment"),
    ("super_glue_boolq", {"question": "is the sky blue", "passage": "The sky is blue by day.",
                          "idx": 0, "label": True},
     "boolq passage: The sky is blue by day. question: is the sky blue", "True"),
    ("super_glue_boolq", {"question": "q", "passage": "p", "idx": 1, "label": False},
     "boolq passage: p question: q", "False"),
    ("super_glue_cb", {"premise": "It rained.", "hypothesis": "The ground is wet.",
                       "label": "neutral", "idx": 1},
     "cb hypothesis: The ground is wet. premise: It rained.", "neutral"),
    ("super_glue_cb", {"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 2},
     "cb hypothesis: H. premise: P.", "contradiction"),
    ("super_glue_copa", {"premise": "The man broke his toe.",
                         "choice1": "He dropped a hammer on his foot.",
                         "choice2": "He got a hole in his sock.", "question": "cause",
                         "label": 0, "idx": 0},
     "copa choice1: He dropped a hammer on his foot. choice2: He got a hole in his sock. "
     "premise: The man broke his toe. question: cause", "choice1"),
    ("super_glue_copa", {"premise": "I tipped the bottle.", "choice1": "It froze.",
                         "choice2": "The liquid poured out.", "question": "effect", "label": 1,
                         "idx": 1},
     "copa choice1: It froze. choice2: The liquid poured out. premise: I tipped the bottle. "
     "question: effect", "choice2"),
    ("super_glue_wic", {"word": "bank", "sentence1": "He sat on the river bank.",
                        "sentence2": "She went to the bank.", "idx": 0, "label": False,
                        "start1": 20, "start2": 17, "end1": 24, "end2": 21},
     "wic sentence1: He sat on the river bank. sentence2: She went to the bank. word: bank",
     "False"),
    # AX-b's sentence1/sentence2 become premise/hypothesis, then RTE's layout.
    ("super_glue_axb", {"sentence1": "The cat sat.", "sentence2": "A cat sat.",
                        "label": "entailment", "idx": 0},
     "rte hypothesis: A cat sat. premise: The cat sat.", "entailment"),
    ("super_glue_axg", {"premise": "The nurse said she was busy.",
                        "hypothesis": "The nurse was busy.", "label": "entailment", "idx": 0,
                        "pair_id": 1},
     "rte hypothesis: The nurse was busy. premise: The nurse said she was busy.", "entailment"),
]


@pytest.mark.parametrize("name, record, inputs, targets", CASES,
                         ids=[f"{c[0]}-{c[1]['idx']}" for c in CASES])
def test_t5_format(name, record, inputs, targets):
  example = get_task(name).format(record)
  assert (example["inputs"], example["targets"]) == (inputs, targets)
  taskless = get_task(f"taskless_{name}").format(record)
  assert (taskless["inputs"], taskless["targets"]) == (inputs.split(" ", 1)[1], targets)


def test_taskless_rte_written_out():
  assert get_task("taskless_super_glue_rte").format(RTE_RECORD)["inputs"] == (
      "hypothesis: A cat is sitting. premise: A cat sat.")


MULTIRC_NESTED = {
    "idx": 4, "version": 1.1,
    "passage": {
        "text": "<b>Sent 1: </b>Sam went <b>home</b>.<br><b>Sent 2: </b>He slept.<br>",
        "questions": [
            {"question": "Where did Sam go?", "idx": 7,
             "answers": [{"text": "home", "idx": 0, "label": 1},
                         {"text": "school", "idx": 1, "label": 0}]},
            {"question": "What did he do?", "idx": 8,
             "answers": [{"text": "slept", "idx": 2, "label": True}]},
        ]}}
MULTIRC_PARAGRAPH = "Sent 1: Sam went home. Sent 2: He slept. "


def test_multirc_one_example_per_answer():
  examples = get_task("super_glue_multirc").examples(MULTIRC_NESTED)
  assert [(ex["inputs"], ex["targets"]) for ex in examples] == [
      (f"multirc question: Where did Sam go? answer: home paragraph: {MULTIRC_PARAGRAPH}",
       "True"),
      (f"multirc question: Where did Sam go? answer: school paragraph: {MULTIRC_PARAGRAPH}",
       "False"),
      (f"multirc question: What did he do? answer: slept paragraph: {MULTIRC_PARAGRAPH}",
       "True"),
  ]
  assert [ex["group"] for ex in examples] == [(4, 7), (4, 7), (4, 8)]
  assert get_task("super_glue_multirc").choices == ("False", "True")


def test_multirc_flat_record_and_taskless():
  flat = {"paragraph": "Sam went home.<br>", "question": "Where?", "answer": "home",
          "idx": {"paragraph": 4, "question": 7, "answer": 0}, "label": 1}
  example = get_task("super_glue_multirc").format(flat)
  assert example["inputs"] == "multirc question: Where? answer: home paragraph: Sam went home. "
  assert example["targets"] == "True" and example["group"] == (4, 7)
  assert get_task("taskless_super_glue_multirc").format(flat)["inputs"] == (
      "question: Where? answer: home paragraph: Sam went home. ")
  with pytest.raises(RecordError, match="makes 3 examples"):
    get_task("super_glue_multirc").format(MULTIRC_NESTED)


def test_multirc_metrics_group_by_question():
  task = get_task("super_glue_multirc")
  examples = task.examples(MULTIRC_NESTED)
  scores = task.evaluate(examples, ["True", "True", "True"])  # question 7: one wrong
  # F1a: tp=2 fp=1 fn=0 -> 0.8; EM: question 7 wrong, question 8 right -> 50.
  assert scores == {"f1": pytest.approx(80.0), "exact_match": pytest.approx(50.0)}


def test_multirc_errors_name_the_nested_field():
  broken = {"idx": 0, "passage": {"text": "t", "questions": [
      {"question": "q", "idx": 0, "answers": [{"idx": 0, "label": 1}]}]}}
  with pytest.raises(RecordError, match=r"passage.questions\[0\].answers\[0\].*'text'"):
    get_task("super_glue_multirc").examples(broken)


RECORD_NESTED = {
    "idx": 2, "source": "Daily mail",
    "passage": {
        "text": "Alice met Bob in Paris.\n@highlight\nThey talked\n@highlight\nBob left",
        # Official ends are inclusive: [0, 4] is "Alice".
        "entities": [{"start": 0, "end": 4}, {"start": 10, "end": 12},
                     {"start": 17, "end": 21}, {"start": 58, "end": 60}]},  # Bob again
    "qas": [{"query": "@placeholder met Bob in France.", "idx": 9,
             "answers": [{"start": 0, "end": 4, "text": "Alice"}]},
            {"query": "They met in @placeholder.", "idx": 10,
             "answers": [{"start": 17, "end": 21, "text": "Paris"},
                         {"start": 17, "end": 21, "text": "Paris"}]}]}
RECORD_PASSAGE = "Alice met Bob in Paris. They talked. Bob left"


def test_record_one_example_per_query():
  examples = get_task("super_glue_record").examples(RECORD_NESTED)
  assert [(ex["inputs"], ex["targets"]) for ex in examples] == [
      ("record query: @placeholder met Bob in France. entities: Alice, Bob, Paris passage: "
       f"{RECORD_PASSAGE}", "Alice"),
      ("record query: They met in @placeholder. entities: Alice, Bob, Paris passage: "
       f"{RECORD_PASSAGE}", "Paris"),
  ]
  assert examples[0]["choices"] == ["Alice", "Bob", "Paris"]
  assert [ex["group"] for ex in examples] == [(2, 9), (2, 10)]
  assert examples[1]["answers"] == ["Paris"]  # duplicates removed


def test_record_training_makes_one_example_per_answer():
  flat = {"passage": "x", "query": "@placeholder y", "entities": ["A", "B", "C"],
          "answers": ["A", "C"], "idx": {"passage": 0, "query": 1}}
  examples = get_task("super_glue_record").examples(flat, training=True)
  assert [ex["targets"] for ex in examples] == ["A", "C"]
  assert examples[0]["inputs"] == "record query: @placeholder y entities: A, B, C passage: x"
  assert get_task("taskless_super_glue_record").format(flat)["inputs"] == (
      "query: @placeholder y entities: A, B, C passage: x")


def test_record_highlights_after_punctuation_keep_it():
  flat = {"passage": "Big news!\n@highlight\n\"Quote\"\n@highlight\nEnd", "query": "q",
          "entities": [], "answers": []}
  assert get_task("super_glue_record").format(flat)["inputs"].endswith(
      'passage: Big news! "Quote" End')


def test_record_metric_is_squad_over_unique_queries():
  task = get_task("super_glue_record")
  examples = task.examples(RECORD_NESTED)
  scores = task.evaluate(examples, ["alice", "the Paris"])  # both match after normalizing
  assert scores == {"em": pytest.approx(100.0), "f1": pytest.approx(100.0)}
  scores = task.evaluate(examples, ["Bob", "Paris"])
  assert scores == {"em": pytest.approx(50.0), "f1": pytest.approx(50.0)}


WSC_OFFICIAL = {"text": "Mitchell asked Tom if he could lend some money.",
                "target": {"span1_text": "Tom", "span1_index": 2, "span2_text": "he",
                           "span2_index": 4},
                "idx": 0, "label": True}


def test_wsc_simple():
  example = get_task("super_glue_wsc").format(WSC_OFFICIAL)
  assert example["inputs"] == "wsc: Mitchell asked Tom if *he* could lend some money."
  assert example["targets"] == "Tom"
  assert get_task("taskless_super_glue_wsc").format(WSC_OFFICIAL)["inputs"] == (
      "Mitchell asked Tom if *he* could lend some money.")
  flat = {"text": WSC_OFFICIAL["text"], **WSC_OFFICIAL["target"], "idx": 0, "label": 1}
  assert get_task("super_glue_wsc").format(flat)["inputs"] == example["inputs"]


def test_wsc_trains_on_correct_referents_only():
  wrong = {**WSC_OFFICIAL, "target": {**WSC_OFFICIAL["target"], "span1_text": "Mitchell",
                                      "span1_index": 0}, "label": False}
  task = get_task("super_glue_wsc")
  assert task.examples(wrong, training=True) == []
  assert len(task.examples(WSC_OFFICIAL, training=True)) == 1
  assert task.examples(wrong)[0]["targets"] == "Mitchell"  # eval keeps every record


def test_wsc_span_repair_and_errors():
  # An official span whose case differs from the text is matched to the text's word.
  lower = {**WSC_OFFICIAL, "target": {**WSC_OFFICIAL["target"], "span1_text": "tom"}}
  assert get_task("super_glue_wsc").format(lower)["targets"] == "Tom"
  bad = {**WSC_OFFICIAL, "target": {**WSC_OFFICIAL["target"], "span2_index": 5}}
  with pytest.raises(RecordError, match="word 5 of field 'text' is not span2_text 'he'"):
    get_task("super_glue_wsc").format(bad)


def test_wsc_postprocessor_compares_with_the_referent():
  task = get_task("super_glue_wsc")
  example = task.format({**WSC_OFFICIAL, "target": {**WSC_OFFICIAL["target"],
                                                     "span1_text": "the big dog",
                                                     "span1_index": 2}})
  # T5's rule: lowercased, determiners dropped, one word set inside the other.
  assert task.postprocess("The big dog", example) == 1
  assert task.postprocess("dog", example) == 1
  assert task.postprocess("the cat", example) == 0
  assert task.postprocess("the", example) == -1  # nothing left: never matches a 0 label
  assert task.postprocess("dog's", example) == 0
  assert task.postprocess(example["targets"], example, is_target=True) == 1
  assert task.evaluate([example, example], ["big dog", "Mitchell"]) == {"accuracy": 50.0}


@pytest.mark.parametrize("name, expected", [
    ("super_glue_boolq", ("False", "True")), ("super_glue_wic", ("False", "True")),
    ("super_glue_cb", ("entailment", "contradiction", "neutral")),
    ("super_glue_copa", ("choice1", "choice2")),
    ("super_glue_rte", ("entailment", "not_entailment")),
    ("super_glue_record", None), ("super_glue_wsc", None)])
def test_choices(name, expected):
  assert get_task(name).choices == expected


def test_cb_metrics_and_postprocess():
  task = get_task("super_glue_cb")
  assert [task.postprocess(t) for t in ("entailment", "contradiction", "neutral", "x")] == [
      0, 1, 2, -1]
  scores = task.compute_metrics([0, 1, 2, 0], [0, 1, 1, -1])
  # per class F1: 0: tp1 fn1 -> 2/3; 1: tp1 fp1 -> 2/3; 2: fn1 -> 0; accuracy 2/4.
  assert scores == {"mean_3class_f1": pytest.approx(100 * 4 / 9), "accuracy": 50.0}


def test_errors_name_the_field_and_labels():
  with pytest.raises(RecordError, match=r"super_glue_rte: .*no field 'hypothesis'"):
    get_task("super_glue_rte").format({"premise": "p", "label": 0})
  with pytest.raises(RecordError, match=r"'label' has the unknown label 'maybe'.*'entailment', "
                                        r"'contradiction', 'neutral'"):
    get_task("super_glue_cb").format({"premise": "p", "hypothesis": "h", "label": "maybe"})
  with pytest.raises(RecordError, match="no field 'answers'"):
    get_task("super_glue_record").format({"passage": "x", "query": "q", "entities": []})
  unlabeled = {"premise": "p", "hypothesis": "h", "idx": 0}  # the official test.jsonl
  assert get_task("super_glue_rte").examples(unlabeled, require_label=False)[0]["targets"] == (
      "<unk>")


def test_record_test_split_without_answers():
  unlabeled = {**RECORD_NESTED, "qas": [{"query": "@placeholder met Bob.", "idx": 9}]}
  with pytest.raises(RecordError, match=r"qas\[0\] has no field 'answers'"):
    get_task("super_glue_record").examples(unlabeled)
  example, = get_task("super_glue_record").examples(unlabeled, require_label=False)
  assert example["targets"] == "<unk>" and example["answers"] == []
