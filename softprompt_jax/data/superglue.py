"""SuperGLUE in T5's text-to-text format, from the official JSONL files or the flat TFDS /
Hugging Face `super_glue` records.

BoolQ, CB, COPA, RTE, WiC and the diagnostics use T5's `glue()` layout ("cb hypothesis: ...
premise: ..." -> "entailment"). MultiRC makes one example per answer option, ReCoRD one per
query (per answer when training), and WSC is T5's `wsc_simple`: the pronoun marked with
asterisks, the target the referent's text, training on correct referents only.
Tasks: super_glue_<name> and taskless_super_glue_<name>.
"""

from __future__ import annotations

import re

from softprompt_jax import metrics
from softprompt_jax.data.glue import glue_preprocessor
from softprompt_jax.data.tasks import (UNKNOWN_TARGET, RecordError, Task, class_id_postprocessor,
                                       field, label_index, label_target, register_task,
                                       short_repr, taskless)

_BOOL = ("False", "True")
_NLI2 = ("entailment", "not_entailment")

# name: (benchmark name in the inputs, text fields in T5's order, label names, metrics)
SUPER_GLUE_CLASSIFICATION = {
    "boolq": ("boolq", ("passage", "question"), _BOOL, (metrics.accuracy,)),
    "cb": ("cb", ("hypothesis", "premise"), ("entailment", "contradiction", "neutral"),
           (metrics.mean_multiclass_f1(3), metrics.accuracy)),
    "copa": ("copa", ("choice1", "choice2", "premise", "question"), ("choice1", "choice2"),
             (metrics.accuracy,)),
    "rte": ("rte", ("hypothesis", "premise"), _NLI2, (metrics.accuracy,)),
    "wic": ("wic", ("sentence1", "sentence2", "word"), _BOOL, (metrics.accuracy,)),
    # The diagnostics, cast as RTE. T5 gives them no metric; SuperGLUE scores AX-b with the
    # Matthews correlation and AX-g with accuracy.
    "axb": ("rte", ("hypothesis", "premise"), _NLI2, (metrics.matthews_corrcoef,)),
    "axg": ("rte", ("hypothesis", "premise"), _NLI2, (metrics.accuracy,)),
}


def _axb_preprocessor():
  rte = glue_preprocessor("rte", ("hypothesis", "premise"), _NLI2)

  def preprocess(record, **options):
    # AX-b's files name the pair sentence1/sentence2; T5 renames them premise/hypothesis.
    renamed = {k: v for k, v in record.items() if k not in ("sentence1", "sentence2")}
    renamed["premise"] = field(record, "sentence1")
    renamed["hypothesis"] = field(record, "sentence2")
    return rte(renamed, **options)
  return preprocess


# --- MultiRC ----------------------------------------------------------------------------------

def _multirc_answers(record: dict, require_label: bool) -> list[dict]:
  """The official nested record as flat per-answer records (the TFDS layout)."""
  passage = field(record, "passage", dict)
  text = field(passage, "text", parent="passage")
  flat = []
  for q, question in enumerate(field(passage, "questions", list, parent="passage")):
    at_question = f"passage.questions[{q}]"
    for a, answer in enumerate(field(question, "answers", list, parent=at_question)):
      at_answer = f"{at_question}.answers[{a}]"
      if require_label:
        field(answer, "label", kind=None, parent=at_answer)
      flat.append({"paragraph": text, "question": field(question, "question", parent=at_question),
                   "answer": field(answer, "text", parent=at_answer), "label": answer.get("label"),
                   "idx": {"paragraph": record.get("idx"), "question": question.get("idx"),
                           "answer": answer.get("idx")}})
  return flat


def _multirc_preprocessor(record: dict, *, training: bool, require_label: bool) -> list[dict]:
  nested = isinstance(record.get("passage"), dict)
  answers = _multirc_answers(record, require_label) if nested else [record]
  examples = []
  for answer in answers:
    joined = " ".join(["multirc question:", field(answer, "question"), "answer:",
                       field(answer, "answer"), "paragraph:", field(answer, "paragraph")])
    # As T5: the paragraphs' HTML line breaks become spaces, bold tags go.
    joined = re.sub(r"<(/)?b>", "", joined.replace("<br>", " "))
    idx = answer.get("idx") if isinstance(answer.get("idx"), dict) else {}
    # Grouped by (paragraph, question): the same as T5's question index where that is unique.
    group = ((idx.get("paragraph"), idx["question"]) if idx.get("question") is not None
             else (answer["paragraph"], answer["question"]))
    examples.append({"inputs": joined, "idx": idx, "group": group,
                     "targets": label_target(answer, _BOOL, required=require_label)})
  return examples


def _multirc_postprocessor(text, example=None, is_target=False):
  value = _BOOL.index(text) if text in _BOOL else -1
  return {"value": value, "group": example["group"]} if is_target else {"value": value}


# --- ReCoRD -----------------------------------------------------------------------------------

def _record_queries(record: dict, require_label: bool) -> list[dict]:
  """The official nested record as flat per-query records (the TFDS layout)."""
  passage = field(record, "passage", dict)
  text = field(passage, "text", parent="passage")
  spans = field(passage, "entities", list, parent="passage")
  try:
    # Entity ends are inclusive in the official files.
    entities = sorted({text[e["start"]:e["end"] + 1] for e in spans})
  except (KeyError, TypeError, IndexError):
    raise RecordError("passage.entities must be a list of {start, end} (integers)",
                      "wrong_type") from None
  queries = []
  for q, qa in enumerate(field(record, "qas", list)):
    if not isinstance(qa, dict):
      raise RecordError(f"qas[{q}] must be a dict; got {type(qa).__name__}", "wrong_type")
    if require_label or qa.get("answers") is not None:  # test splits: absent or null
      field(qa, "answers", list, parent=f"qas[{q}]")
    answers = [field(a, "text", parent=f"qas[{q}].answers[{i}]", non_empty=False)
               for i, a in enumerate(qa.get("answers") or [])
               if isinstance(a, dict) and "text" in a]
    queries.append({"passage": text, "query": field(qa, "query", parent=f"qas[{q}]"),
                    "entities": entities, "answers": sorted(set(answers)),
                    "idx": {"passage": record.get("idx"), "query": qa.get("idx", q)}})
  return queries


def record_passage(passage: str) -> str:
  """The passage with CNN/Daily Mail's "@highlight" bullet markers turned into sentences."""
  passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", passage)
  return re.sub(r"\n@highlight\n", ". ", passage)


def _strings(record: dict, name: str) -> list[str]:
  """record[name] as a list of strings, or a RecordError naming the field."""
  values = field(record, name, list)
  if not all(isinstance(v, str) for v in values):
    raise RecordError(f"field {name!r} must be a list of str; got {short_repr(values)}",
                      "wrong_type")
  return values


def _record_preprocessor(record: dict, *, training: bool, require_label: bool) -> list[dict]:
  nested = isinstance(record.get("passage"), dict)
  examples = []
  for query in (_record_queries(record, require_label) if nested else [record]):
    entities = _strings(query, "entities")
    inputs = " ".join(["record query:", field(query, "query"), "entities:", ", ".join(entities),
                       "passage:", record_passage(field(query, "passage"))])
    answers = (_strings(query, "answers") if require_label or query.get("answers") is not None
               else [])
    idx = query.get("idx") if isinstance(query.get("idx"), dict) else {}
    group = (idx.get("passage"), idx["query"]) if idx.get("query") is not None else inputs
    # T5 makes one example per answer and scores only the first of each query; at eval one
    # example per query gives the same scores without the duplicates.
    targets = (answers or [UNKNOWN_TARGET]) if training else [(answers or [UNKNOWN_TARGET])[0]]
    examples += [{"inputs": inputs, "targets": t, "answers": answers, "choices": entities,
                  "idx": idx, "group": group} for t in targets]
  return examples


def _record_postprocessor(text, example=None, is_target=False):
  if is_target:
    return {"value": list(example["answers"]), "group": example["group"]}
  return {"value": text}


# --- WSC (T5's wsc_simple) --------------------------------------------------------------------

# Two WSC texts whose pronoun is not the word at span2_index; T5 writes their inputs out.
_WSC_SPECIAL_CASES = {
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    "out quite loud. \"Good for him,\" he said. ":
        "The boy continued to whip the pony , and eventually the pony threw him over. John "
        "laughed out quite loud. \"Good for X ,\" he said.",
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
    "could they wish for?":
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
        "magic pebble in an iron safe . Some day they might want to use X , but really for now, "
        "what more could they wish for?",
}


def _fixed_span(text: str, span: str, index: int) -> str:
  """The span as it is written in the text (TFDS's wsc.fixed repairs of the official spans)."""
  if span in text:
    return span
  words = text.split()
  if 0 <= index < len(words) and span:
    first = words[index]
    span = (span[0].lower() if first[:1].islower() else span[0].upper()) + span[1:]
  return span.rstrip(".").replace("\n", " ")


def _wsc_preprocessor(record: dict, *, training: bool, require_label: bool) -> list[dict]:
  spans = field(record, "target", dict) if "target" in record else record  # official: nested
  text = field(record, "text")
  referent = _fixed_span(text, field(spans, "span1_text"), field(spans, "span1_index", int))
  pronoun_index = field(spans, "span2_index", int)
  pronoun = _fixed_span(text, field(spans, "span2_text"), pronoun_index)
  label = label_index(record, _BOOL, required=require_label)
  if training and label != 1:
    return []  # T5 trains on the correct referents only
  if text in _WSC_SPECIAL_CASES:
    blanked = _WSC_SPECIAL_CASES[text]
  else:
    words = text.split(" ")
    if not 0 < pronoun_index < len(words) or words[pronoun_index] != pronoun:
      raise RecordError(f"word {pronoun_index} of field 'text' is not span2_text {pronoun!r}")
    blanked = " ".join(words[:pronoun_index] + ["X"] + words[pronoun_index + 1:])
  inputs = "wsc: " + blanked.replace(" X ", f" *{pronoun}* ")
  return [{"inputs": inputs, "targets": referent, "label": label, "idx": record.get("idx")}]


_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those which "
    "whose your".split())


def _wsc_words(text: str) -> str:
  return " ".join(w for w in text.strip().lower().split(" ") if w not in _DETERMINERS)


def _wsc_postprocessor(text, example=None, is_target=False):
  """T5's wsc_simple: 1 if the output names the example's referent, else 0; the target is
  the label (-1 unlabeled)."""
  if is_target:
    return -1 if example.get("label") is None else example["label"]
  prediction, referent = _wsc_words(text), _wsc_words(example["targets"])
  if not prediction:
    return -1  # an empty output must not match a 0 label
  if ("'" in prediction) != ("'" in referent):
    return 0  # "Bob" is not "Bob's hat"
  predicted, wanted = set(prediction.split(" ")), set(referent.split(" "))
  return int(predicted <= wanted or wanted <= predicted)


# --- Registry ---------------------------------------------------------------------------------

def super_glue_tasks() -> list[Task]:
  tasks = []
  for name, (benchmark, text_fields, label_names, metric_fns) in (
      SUPER_GLUE_CLASSIFICATION.items()):
    preprocessor = (_axb_preprocessor() if name == "axb"
                    else glue_preprocessor(benchmark, text_fields, label_names))
    tasks.append(Task(name=f"super_glue_{name}", preprocessor=preprocessor,
                      postprocessor=class_id_postprocessor(label_names), metrics=metric_fns,
                      choices=label_names, description=f"SuperGLUE {name}"))
  tasks.append(Task(
      name="super_glue_multirc", preprocessor=_multirc_preprocessor,
      postprocessor=_multirc_postprocessor, choices=_BOOL,
      metrics=(metrics.multirc_f1_over_all_answers, metrics.mean_group_metric(metrics.all_match)),
      description="SuperGLUE MultiRC, one example per answer option"))
  tasks.append(Task(
      name="super_glue_record", preprocessor=_record_preprocessor,
      postprocessor=_record_postprocessor,
      metrics=(metrics.deduplicate_metric(metrics.squad),),
      description="SuperGLUE ReCoRD; each example's candidate entities are its 'choices'"))
  tasks.append(Task(
      name="super_glue_wsc", preprocessor=_wsc_preprocessor, postprocessor=_wsc_postprocessor,
      metrics=(metrics.accuracy,), description="SuperGLUE WSC as T5's wsc_simple"))
  return tasks


for _task in super_glue_tasks():
  register_task(_task, overwrite=True)
  register_task(taskless(_task), overwrite=True)
