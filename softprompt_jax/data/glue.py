"""GLUE in T5's text-to-text format (`t5.data.preprocessors.glue`, `stsb`), on the field names
of the TFDS / Hugging Face `glue` datasets.

Inputs are the benchmark name, then "field: text" for each text field in T5's order (sorted by
name), joined by single spaces: "mnli hypothesis: ... premise: ...". Targets are label names.
Tasks: glue_<name> and taskless_glue_<name> (the same without the leading benchmark name).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from softprompt_jax import metrics
from softprompt_jax.data.tasks import (UNKNOWN_TARGET, RecordError, Task, class_id_postprocessor,
                                       field, label_target, register_task, short_repr, taskless)

_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

# name: (benchmark name in the inputs, text fields in T5's order, label names, metrics)
GLUE_CLASSIFICATION = {
    "cola": ("cola", ("sentence",), ("unacceptable", "acceptable"),
             (metrics.matthews_corrcoef,)),
    "sst2": ("sst2", ("sentence",), ("negative", "positive"), (metrics.accuracy,)),
    "mrpc": ("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
             (metrics.f1_score_with_invalid, metrics.accuracy)),
    "qqp": ("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
            (metrics.f1_score_with_invalid, metrics.accuracy)),
    "mnli": ("mnli", ("hypothesis", "premise"), _NLI3, (metrics.accuracy,)),
    "mnli_matched": ("mnli", ("hypothesis", "premise"), _NLI3, (metrics.accuracy,)),
    "mnli_mismatched": ("mnli", ("hypothesis", "premise"), _NLI3, (metrics.accuracy,)),
    "qnli": ("qnli", ("question", "sentence"), _NLI2, (metrics.accuracy,)),
    "rte": ("rte", ("sentence1", "sentence2"), _NLI2, (metrics.accuracy,)),
    "wnli": ("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
             (metrics.accuracy,)),
    # The diagnostic set, cast as MNLI. T5 gives it no metric (its labels were private); the
    # released labels are scored with the Matthews correlation, as GLUE's leaderboard does.
    "ax": ("mnli", ("hypothesis", "premise"), _NLI3, (metrics.matthews_corrcoef,)),
}


def _with_idx(example: dict, record: dict) -> dict:
  if "idx" in record:
    example["idx"] = record["idx"]
  return example


def glue_preprocessor(benchmark: str, text_fields: Sequence[str], label_names: Sequence[str]):
  """T5's `glue()`: "<benchmark> <field1>: <text1> <field2>: <text2>" -> a label name."""
  def preprocess(record: dict, *, training: bool, require_label: bool) -> list[dict]:
    parts = [benchmark]
    for name in text_fields:
      parts += [f"{name}:", field(record, name)]
    return [_with_idx({"inputs": " ".join(parts),
                       "targets": label_target(record, label_names, required=require_label)},
                      record)]
  return preprocess


def stsb_target(label) -> str:
  """The score rounded to a multiple of 0.2 and written with one decimal ("3.4").

  In float32 with ties to even, as T5's `tf.round(label * 5) / 5`: 0.5 -> "0.4".
  """
  value = np.round(np.float32(label) * np.float32(5)) / np.float32(5)
  return f"{float(value):.1f}"


def _stsb_preprocessor(record: dict, *, training: bool, require_label: bool) -> list[dict]:
  parts = ["stsb sentence1:", field(record, "sentence1"), "sentence2:", field(record, "sentence2")]
  label = record.get("label") if not require_label else field(record, "label", kind=None)
  score = None
  if isinstance(label, (numbers.Real, str)) and not isinstance(label, bool):
    try:
      score = float(label)
    except ValueError:
      pass
  if label is None or score == -1:  # unlabeled, as test splits are
    target = UNKNOWN_TARGET
  elif score is not None and 0 <= score <= 5:  # NaN fails this too
    target = stsb_target(score)
  else:
    raise RecordError(f"field 'label' must be a similarity score (a number from 0 to 5); "
                      f"got {short_repr(label)}", "unknown_label")
  return [_with_idx({"inputs": " ".join(parts), "targets": target}, record)]


def _to_float(text, example=None, is_target=False) -> float:
  """T5's string_to_float: -1 for text that is not a number."""
  try:
    return float(text)
  except ValueError:
    return -1.0


def glue_tasks() -> list[Task]:
  tasks = []
  for name, (benchmark, text_fields, label_names, metric_fns) in GLUE_CLASSIFICATION.items():
    tasks.append(Task(
        name=f"glue_{name}",
        preprocessor=glue_preprocessor(benchmark, text_fields, label_names),
        postprocessor=class_id_postprocessor(label_names), metrics=metric_fns,
        choices=label_names, description=f"GLUE {name}"))
  tasks.append(Task(name="glue_stsb", preprocessor=_stsb_preprocessor, postprocessor=_to_float,
                    metrics=(metrics.pearson_corrcoef, metrics.spearman_corrcoef),
                    description="GLUE stsb (score as text, rounded to 0.2)"))
  return tasks


for _task in glue_tasks():
  register_task(_task, overwrite=True)  # overwrite: importing twice (a reload) is harmless
  register_task(taskless(_task), overwrite=True)
