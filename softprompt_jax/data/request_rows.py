"""One prediction request: {"task": name, "inputs": text} or {"task": name, "record": {...}},
checked against the names of a prompt bank. `infer` reads them from a JSONL file and the server
from request bodies; both check them here, so a line and a request mean the same thing.

Errors are RecordErrors (reason as the data pipeline counts them) whose message starts with
`location` (file:line, or the request field) and names the field."""

from __future__ import annotations

from typing import Callable, Sequence

from softprompt_jax.data.tasks import RecordError, Task, UnknownTaskError


class UnknownBankTaskError(RecordError):
  """The request names a task that has no prompt in the bank."""


def json_type(value) -> str:
  """The JSON name of a parsed value's type, as a user wrote it."""
  names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
           list: "list", dict: "object"}
  return names.get(type(value), type(value).__name__)


def check_task(row: dict, location: str, names: Sequence[str]) -> str:
  """The row's task name, which must be one of the bank's `names`."""
  if "task" not in row:
    raise RecordError(f"{location}: needs field 'task' (one of {list(names)})", "missing_field")
  task = row["task"]
  if not isinstance(task, str):
    raise RecordError(f"{location}: field 'task' must be a string, got {json_type(task)}",
                      "wrong_type")
  if task not in names:
    raise UnknownBankTaskError(f"{location}: field 'task' is {task!r}; the prompt bank has "
                               f"{list(names)}", "invalid_record")
  return task


def request_row(row, location: str, names: Sequence[str],
                get_task: Callable[[str], Task]) -> dict:
  """`row` with its model input under "inputs" (made from "record" by the task's format when
  the row gives a raw record instead of text)."""
  if not isinstance(row, dict):
    raise RecordError(f"{location}: must be a JSON object with 'task' and 'inputs', got "
                      f"{json_type(row)}", "wrong_type")
  task = check_task(row, location, names)
  if "inputs" in row:
    if not isinstance(row["inputs"], str):
      raise RecordError(f"{location}: field 'inputs' must be a string, got "
                        f"{json_type(row['inputs'])}", "wrong_type")
    return row
  if "record" in row:
    try:
      registered = get_task(task)
    except UnknownTaskError:  # a bank may name its tasks freely; a record needs a format
      raise RecordError(f"{location}: field 'record' needs a registered task to format it, and "
                        f"{task!r} is none; send the model input as 'inputs' text",
                        "invalid_record") from None
    return {**row, "inputs": record_inputs(registered, row["record"], location)}
  raise RecordError(f"{location}: needs field 'inputs' (text) or 'record' (a raw {task} "
                    "record)", "missing_field")


def record_inputs(task: Task, record, location: str) -> str:
  """The model input of a raw task record (its label may be absent: it is to be predicted)."""
  if not isinstance(record, dict):
    raise RecordError(f"{location}: field 'record' must be an object, got "
                      f"{json_type(record)}", "wrong_type")
  try:
    examples = task.examples(record, require_label=False)
  except RecordError as e:
    raise RecordError(f"{location}: field 'record': {e}", e.reason) from None
  if len(examples) != 1:
    raise RecordError(f"{location}: field 'record' makes {len(examples)} examples for "
                      f"{task.name}; give one 'inputs' line per example instead",
                      "invalid_record")
  return examples[0]["inputs"]
