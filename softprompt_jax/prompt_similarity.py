"""How alike two soft prompts are, as SPoT (Vu et al. 2022) compares task prompts, read as task
embeddings, to predict which source task's prompt transfers best to a target task.

Three measures of prompts a [P, H] and b [Q, H] (cosine similarity `cos`):

- `average`: cos(mean_i a_i, mean_j b_j), SPoT's "cosine similarity of average tokens";
- `per_token`: mean over i, j of cos(a_i, b_j), SPoT's "per-token average cosine similarity"
  (every pair of prompt vectors; like `average`, blind to the order of the positions);
- `per_position`: mean over i of cos(a_i, b_i), position by position (equal lengths only): this
  one sees the order, e.g. a prompt and a copy of it with its positions permuted.

Plain numpy; `similarity_report` makes the matrices of a list of prompts.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

import numpy as np

from softprompt_jax.errors import UserError

MEASURES = ("average", "per_token", "per_position")


class PromptSimilarityError(UserError, ValueError):
  """Prompts that cannot be compared (not [P, H], or of different widths)."""


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _checked(name: str, prompt) -> np.ndarray:
  values = np.asarray(prompt, np.float64)  # cosines of long sums: float64 keeps them exact
  if values.ndim != 2:
    raise PromptSimilarityError(f"{name}: a prompt is [prompt_length, d_model], got shape "
                                f"{values.shape}")
  return values


def similarity(a_PxH, b_QxH) -> dict[str, Optional[float]]:
  """{measure: value} of two prompts (see the module); `per_position` is None when P != Q."""
  a, b = _checked("the first prompt", a_PxH), _checked("the second prompt", b_QxH)
  if a.shape[-1] != b.shape[-1]:
    raise PromptSimilarityError(f"prompts of different widths ({a.shape[-1]} and "
                                f"{b.shape[-1]}) come from different models; compare prompts "
                                "of one model")
  unit_a, unit_b = _unit(a), _unit(b)
  average = float(_unit(a.mean(0)) @ _unit(b.mean(0)))
  per_token = float(np.mean(unit_a @ unit_b.T))
  per_position = (float(np.mean(np.sum(unit_a * unit_b, axis=-1)))
                  if a.shape[0] == b.shape[0] else None)
  return {"average": average, "per_token": per_token, "per_position": per_position}


def similarity_report(prompts: Mapping[str, np.ndarray]) -> dict:
  """{"prompts": names, "shapes": [[P, H], ...], measure: N x N matrix (None where a measure
  does not apply)} of every pair of the named prompts, in the mapping's order."""
  names = list(prompts)
  values = [_checked(name, prompts[name]) for name in names]
  widths = {name: v.shape[-1] for name, v in zip(names, values)}
  if len(set(widths.values())) > 1:
    raise PromptSimilarityError(f"the prompts have different widths {widths}: they come from "
                                "different models; compare prompts of one model")
  report = {"prompts": names, "shapes": [list(v.shape) for v in values]}
  for measure in MEASURES:
    report[measure] = [[None] * len(names) for _ in names]
  for i, a in enumerate(values):
    for j, b in enumerate(values):
      for measure, value in similarity(a, b).items():
        report[measure][i][j] = None if value is None else round(value, 6)
  return report


def report_json(report: dict) -> str:
  """The report as JSON text, one line per matrix row (readable at a glance, parsed by any JSON
  reader)."""
  lines = []
  for key, value in report.items():
    if key in MEASURES:
      rows = ",\n".join(f"  {json.dumps(row)}" for row in value)
      lines.append(f' {json.dumps(key)}: [\n{rows}\n ]')
    else:
      lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
  return "{\n" + ",\n".join(lines) + "\n}\n"


def format_report(report: dict) -> str:
  """The report's matrices as text: one block per measure, prompts numbered, names listed."""
  names = report["prompts"]
  lines = [f"[{i}] {name} {tuple(shape)}" for i, (name, shape)
           in enumerate(zip(names, report["shapes"]))]
  header = " " * 6 + "".join(f"{f'[{j}]':>9}" for j in range(len(names)))
  for measure in MEASURES:
    lines += ["", f"{measure}:", header]
    for i, row in enumerate(report[measure]):
      cells = "".join(f"{'-' if v is None else f'{v:.4f}':>9}" for v in row)
      lines.append(f"{f'[{i}]':>6}{cells}")
  return "\n".join(lines)
