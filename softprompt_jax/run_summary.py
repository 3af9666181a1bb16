"""`summary.json`: a run's outcome, written last as the mark of a complete run, and its one line
on stderr."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, TextIO

from softprompt_jax import output_files
from softprompt_jax.progress import format_duration
from softprompt_jax.run_layout import SUMMARY_FILE


def write_summary(run_dir, summary: dict, *, stream: Optional[TextIO] = None) -> Path:
  """Write `run_dir/summary.json` atomically and print a one-line summary of it to `stream`.

  The line shows whichever of these keys `summary` has: "steps", "wall_time_s", "final_loss",
  and "best_metric" with "best_value" and "best_step"; the file holds all of `summary`.
  """
  path = Path(run_dir) / SUMMARY_FILE
  text = json.dumps(summary, indent=2, default=_json_default) + "\n"  # fails before any write
  output_files.write_text(path, text)

  parts = []
  if "steps" in summary:
    parts.append(f"{summary['steps']} steps")
  if "wall_time_s" in summary:
    parts.append(f"wall time {format_duration(float(summary['wall_time_s']))}")
  if summary.get("final_loss") is not None:
    parts.append(f"final loss {float(summary['final_loss']):.4g}")
  if summary.get("best_value") is not None:
    best = f"best {summary.get('best_metric', 'metric')} {float(summary['best_value']):.4g}"
    if "best_step" in summary:
      best += f" at step {summary['best_step']}"
    parts.append(best)
  stream = stream if stream is not None else sys.stderr
  stream.write(f"run summary: {', '.join(parts) or 'written'} ({path})\n")
  stream.flush()
  return path


def _json_default(value):
  """numpy/jax scalars and arrays, and paths, which `json` cannot serialize on its own."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")
