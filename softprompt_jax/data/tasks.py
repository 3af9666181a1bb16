"""Tasks: how a raw record becomes text-to-text examples, and how its outputs are scored.

A task is data, not a class hierarchy: a preprocessor (record -> examples), a postprocessor
(output text -> value the metrics compare), metric functions, and, for fixed-label
classification, the target strings to rank. Tasks live in a registry by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import re
from typing import Any, Callable, Iterable, Sequence

from softprompt_jax import metrics as metrics_lib
from softprompt_jax.errors import UserError

UNKNOWN_TARGET = "<unk>"  # T5's target for an unlabeled (test-set) record


class RecordError(UserError, ValueError):
  """A record that a task cannot format: a missing, empty or ill-typed field, an unknown label.

  `reason` is a short category ("missing_field", "empty_field", "wrong_type", "unknown_label",
  "invalid_record") by which skipped records are counted.
  """

  def __init__(self, message: str, reason: str = "invalid_record"):
    super().__init__(message)
    self.reason = reason


class UnknownTaskError(UserError, KeyError):
  def __str__(self) -> str:  # KeyError would quote the message
    return str(self.args[0])


# (record, *, training, require_label) -> examples. Each example has "inputs" and "targets"
# strings and may carry keys the postprocessor needs at eval ("idx", "answers", "group", ...).
Preprocessor = Callable[..., list[dict]]
# (text, example, is_target) -> the value the metrics compare.
Postprocessor = Callable[[str, "dict | None", bool], Any]


def identity_postprocessor(text: str, example: dict | None = None, is_target: bool = False):
  return text


@dataclasses.dataclass(frozen=True)
class Task:
  """One text-to-text task. `source(split)`, when set, yields the task's built-in records."""

  name: str
  preprocessor: Preprocessor
  postprocessor: Postprocessor = identity_postprocessor
  metrics: tuple[metrics_lib.MetricFn, ...] = ()
  choices: tuple[str, ...] | None = None
  source: Callable[[str], Iterable[dict]] | None = None
  description: str = ""

  @property
  def metric_names(self) -> tuple[str, ...]:
    """The keys `compute_metrics` returns, in order (of metrics that declare them)."""
    return tuple(name for fn in self.metrics for name in getattr(fn, "metric_names", ()))

  def examples(self, record: dict, *, training: bool = False,
               require_label: bool = True) -> list[dict]:
    """The examples of one record (several for MultiRC answers and ReCoRD answers).

    With `training`, records that T5 trains on differently are treated as T5 does (WSC keeps
    only correct referents; ReCoRD makes one example per answer). Without `require_label`, a
    record lacking its label gets the target "<unk>" (a test split); with it, that is an error.
    """
    if not isinstance(record, dict):
      raise RecordError(f"{self.name}: a record must be a dict of fields; got "
                        f"{type(record).__name__}", "not_an_object")
    try:
      return self.preprocessor(record, training=training, require_label=require_label)
    except RecordError as e:
      raise RecordError(f"{self.name}: {e}", e.reason) from None

  def format(self, record: dict) -> dict:
    """The one eval example of `record`: {"inputs": str, "targets": str, ...}."""
    examples = self.examples(record)
    if len(examples) != 1:
      raise RecordError(f"{self.name}: this record makes {len(examples)} examples; use "
                        "task.examples(record)")
    return examples[0]

  def postprocess(self, text: str, example: dict | None = None, *, is_target: bool = False):
    """Model output (or, with `is_target`, the example's target) -> the value metrics compare."""
    return self.postprocessor(text, example, is_target)

  def compute_metrics(self, targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """All the task's metrics on postprocessed targets and predictions."""
    return metrics_lib.compute(self.metrics, targets, predictions)

  def evaluate(self, examples: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Metrics of decoded `predictions` for `examples` (as the pipeline returned them)."""
    targets = [self.postprocess(ex["targets"], ex, is_target=True) for ex in examples]
    values = [self.postprocess(text, ex) for text, ex in zip(predictions, examples)]
    return self.compute_metrics(targets, values)


# --- Record fields ----------------------------------------------------------------------------

def short_repr(value, limit: int = 60) -> str:
  """repr(value), cut to `limit` characters: error messages stay one readable line."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def field(record: dict, name: str, kind: type | tuple[type, ...] | None = str,
          parent: str = "the record", non_empty: bool | None = None):
  """record[name], or a RecordError naming the field (and its expected type).

  non_empty: an empty or whitespace-only string is an error (a model input of nothing is a
  broken record, not data). Default: for text fields (kind str), as all the built-in tasks'
  text inputs are; pass False for text that may legitimately be empty.
  """
  if not isinstance(record, dict):
    raise RecordError(f"{parent} must be a dict of fields; got {type(record).__name__}",
                      "wrong_type")
  qualified = name if parent == "the record" else f"{parent}.{name}"
  if name not in record:
    fields = sorted(map(str, record))
    listed = ", ".join(map(repr, fields[:20])) + (", ..." if len(fields) > 20 else "")
    raise RecordError(f"{parent} has no field {name!r} (its fields: [{listed}])",
                      "missing_field")
  value = record[name]
  if kind is not None and not isinstance(value, kind):
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise RecordError(f"field {qualified!r} must be {names}; got {type(value).__name__} "
                      f"{short_repr(value)}", "wrong_type")
  if non_empty is None:
    non_empty = kind is str
  if non_empty and isinstance(value, str) and not value.strip():
    raise RecordError(f"field {qualified!r} is empty{'' if not value else ' (only whitespace)'}"
                      "; it must hold some text", "empty_field")
  return value


def label_index(record: dict, label_names: Sequence[str], name: str = "label",
                required: bool = True) -> int | None:
  """The class index of record[name]: an index, a bool, a label name or a digit string.

  None when the record is unlabeled: -1 or None, as test splits have, or no field at all when
  not `required`.
  """
  if not required and name not in record:
    return None
  value = field(record, name, kind=None)
  if value is None or (isinstance(value, numbers.Real) and value == -1) or value == "-1":
    return None
  index = None
  if isinstance(value, bool):  # SuperGLUE's official files: true/false
    index = int(value)
  elif isinstance(value, numbers.Integral):
    index = int(value)
  elif isinstance(value, numbers.Real) and float(value).is_integer():
    index = int(value)
  elif isinstance(value, str):
    if value in label_names:
      index = list(label_names).index(value)
    elif re.fullmatch(r"-?[0-9]+", value.strip()):  # a TSV/CSV cell; ASCII digits only
      index = int(value.strip())
    elif value.lower() in ("true", "false") and tuple(label_names) == ("False", "True"):
      index = int(value.lower() == "true")
  if index is None or not 0 <= index < len(label_names):
    raise RecordError(f"field {name!r} has the unknown label {short_repr(value)}; expected one "
                      f"of {list(label_names)} or an index 0..{len(label_names) - 1}",
                      "unknown_label")
  return index


def label_target(record: dict, label_names: Sequence[str], name: str = "label",
                 required: bool = True) -> str:
  index = label_index(record, label_names, name, required)
  return UNKNOWN_TARGET if index is None else label_names[index]


def class_id_postprocessor(label_names: Sequence[str]) -> Postprocessor:
  """T5's string_label_to_class_id: the label's index, -1 for anything else."""
  names = list(label_names)

  def to_class_id(text, example=None, is_target=False):
    return names.index(text) if text in names else -1
  return to_class_id


def drop_first_word(text: str) -> str:
  """The prompt-tuning paper's "taskless" inputs: everything after the first space."""
  return re.sub(r"^[^ ]* ", "", text, count=1)


def taskless(task: Task) -> Task:
  """`task` without the leading task name in its inputs, named taskless_<name>."""
  def preprocessor(record, **options):
    return [{**ex, "inputs": drop_first_word(ex["inputs"])}
            for ex in task.preprocessor(record, **options)]
  return dataclasses.replace(task, name=f"taskless_{task.name}", preprocessor=preprocessor,
                             description=f"{task.description} (without the task name)".strip())


# --- Registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
  if not overwrite and task.name in _REGISTRY:
    raise ValueError(f"a task named {task.name!r} is already registered "
                     "(pass overwrite=True to replace it)")
  _REGISTRY[task.name] = task
  return task


def list_tasks(prefix: str = "") -> list[str]:
  return sorted(name for name in _REGISTRY if name.startswith(prefix))


def get_task(name: str | Task) -> Task:
  """The registered task `name`; T5's version suffixes (`glue_sst2_v002`) and prompt-tuning's
  (`taskless_glue_sst2_v200_examples`: the same data at a TFDS version) are accepted."""
  if isinstance(name, Task):
    return name
  if name in _REGISTRY:
    return _REGISTRY[name]
  unversioned = re.sub(r"_v\d{3}(_examples)?$", "", name)
  if unversioned in _REGISTRY:
    return _REGISTRY[unversioned]
  close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.6)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  raise UnknownTaskError(f"unknown task {name!r}{hint} (softprompt_jax.data.list_tasks() lists all "
                 f"{len(_REGISTRY)})")
