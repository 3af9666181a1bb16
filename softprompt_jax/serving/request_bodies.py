"""The server's request bodies, read and checked before anything is queued. A bad body is a
RequestError: an HTTP status (400, or 404 for a task the bank does not have) and one line that
names the field, as `infer` names file:line and field for a bad line (the same checks:
data.request_rows)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np

from softprompt_jax.data.readers import DuplicateKey, decode_json
from softprompt_jax.data.request_rows import UnknownBankTaskError, json_type, request_row
from softprompt_jax.data.tasks import RecordError, Task, UnknownTaskError
from softprompt_jax.tokenizers import TokenizerInputError, Vocabulary


class RequestError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold: tokens (EOS included) of an input and of a label, labels per
  score, examples per request."""
  input_length: int
  target_length: int
  max_labels: int
  max_instances: int


@dataclasses.dataclass
class Instance:
  """One checked example: its row ({"task", "inputs", ...} as infer reads a line), input ids
  with EOS, and for a score its labels and their ids [C, target_length]."""
  row: dict
  tokens: list[int]
  labels: Optional[tuple[str, ...]] = None
  label_ids: Optional[np.ndarray] = None


def parse_json(body: bytes) -> Any:
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(400, f"the body is not UTF-8 (byte {e.start}); send JSON text") from None
  if not text.strip():
    raise RequestError(400, "the body is empty; send a JSON object")
  try:
    return decode_json(text)
  except DuplicateKey as e:
    raise RequestError(400, f"the key {e.key!r} appears twice in one JSON object; keep one"
                       ) from None
  except json.JSONDecodeError as e:
    raise RequestError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})"
                       ) from None
  except RecursionError:
    raise RequestError(400, "malformed JSON: nested too deeply to read") from None


def located_instances(body: Any, max_instances: int) -> tuple[list[tuple[str, Any]], bool]:
  """[(location, row)] of a body that is one example or {"instances": [...]}, and whether it
  was a list (the response is then a list)."""
  if not isinstance(body, dict):
    raise RequestError(400, f"the body must be a JSON object, got {json_type(body)}")
  if "instances" not in body:
    return [("body", body)], False
  rows = body["instances"]
  if not isinstance(rows, list):
    raise RequestError(400, f"field 'instances' must be a list, got {json_type(rows)}")
  if not 1 <= len(rows) <= max_instances:
    raise RequestError(400, f"field 'instances' has {len(rows)} examples; give 1 to "
                       f"{max_instances} per request")
  return [(f"instances[{i}]", row) for i, row in enumerate(rows)], True


def instances(body: Any, *, kind: str, names: Sequence[str], get_task: Callable[[str], Task],
              vocabulary: Vocabulary, limits: Limits) -> tuple[list[Instance], bool]:
  """The checked examples of a predict ("predict") or score ("score") body, and whether the
  body held a list."""
  located, is_list = located_instances(body, limits.max_instances)
  checked = []
  for location, row in located:
    try:
      row = request_row(row, location, names, get_task)
    except UnknownBankTaskError as e:
      raise RequestError(404, str(e)) from None
    except RecordError as e:
      raise RequestError(400, str(e)) from None
    tokens = _token_ids(vocabulary, row["inputs"], f"{location}: field 'inputs'",
                        limits.input_length, "serve.input_length")
    instance = Instance(row, tokens)
    if kind == "score":
      instance.labels = _labels(row, location, get_task, limits)
      instance.label_ids = np.stack([
          _padded(_token_ids(vocabulary, label, f"{location}: label {label!r}",
                             limits.target_length, "serve.target_length"), limits.target_length)
          for label in instance.labels])
    checked.append(instance)
  return checked, is_list


def _labels(row: dict, location: str, get_task, limits: Limits) -> tuple[str, ...]:
  """The labels to rank: the row's "labels", else its task's fixed label set."""
  if "labels" not in row:
    try:
      choices = get_task(row["task"]).choices
    except UnknownTaskError:
      choices = None
    if not choices:
      raise RequestError(400, f"{location}: needs field 'labels' (a list of label texts): "
                         f"task {row['task']!r} has no fixed label set")
    return tuple(choices)
  labels = row["labels"]
  if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
    raise RequestError(400, f"{location}: field 'labels' must be a non-empty list of strings, "
                       f"got {json_type(labels)}")
  if len(set(labels)) != len(labels):
    raise RequestError(400, f"{location}: field 'labels' names a label twice")
  if len(labels) > limits.max_labels:
    raise RequestError(400, f"{location}: field 'labels' has {len(labels)} labels; this server "
                       f"ranks at most {limits.max_labels} (serve.max_labels)")
  return tuple(labels)


def _token_ids(vocabulary: Vocabulary, text: str, what: str, limit: int,
               setting: str) -> list[int]:
  """The ids of `text` with EOS; over `limit` is an error (infer would cut it silently)."""
  try:
    ids = vocabulary.encode(text) + [vocabulary.eos_id]
  except TokenizerInputError as e:
    raise RequestError(400, f"{what}: {e}") from None
  if len(ids) > limit:
    raise RequestError(400, f"{what} is {len(ids)} tokens with EOS; this server takes at most "
                       f"{limit} ({setting}): shorten it")
  return ids


def _padded(ids: list[int], length: int) -> np.ndarray:
  out = np.zeros((length,), np.int32)
  out[:len(ids)] = ids
  return out


def task_to_add(body: Any) -> tuple[str, str]:
  """(name, prompt source) of a POST /v1/tasks body {"name": ..., "prompt": path}."""
  if not isinstance(body, dict):
    raise RequestError(400, f"the body must be a JSON object, got {json_type(body)}")
  for field, what in (("name", "the task's name"),
                      ("prompt", "a .npy file, a PEFT adapter directory or a run directory "
                                 "on the server")):
    if field not in body:
      raise RequestError(400, f"needs field {field!r} ({what})")
    if not isinstance(body[field], str) or not body[field]:
      raise RequestError(400, f"field {field!r} must be a non-empty string, got "
                         f"{json_type(body[field])}")
  return body["name"], body["prompt"]
