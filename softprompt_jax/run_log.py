"""The training loop's log: `metrics.jsonl`, TensorBoard scalars and a progress line; reading back.

`RunLog` is what the training loop talks to. Every record goes to `run_dir/metrics.jsonl`, one
JSON object a line, flushed as written and appended to across restarts; that file is the record
the other functions here read back. A restart writes a start marker (`{"event": "start", "step":
s, ...}`), and `read_metrics` drops what the crashed run logged past step s, since the resumed run
logs those steps again. TensorBoard gets the same scalars, one subdirectory per split, so train
and validation curves of the same tag overlay; train scalars under t5x's names (`loss`,
`learning_rate`, `timing/steps_per_second`, ... see T5X_TAGS), so its runs and ours compare.

Every file here is written in the caller's thread, and an OSError names the file (a write() on a
full disk names none), so a full or read-only disk stops the run with one line. The run's whole
files are written elsewhere (curves, run_summary), atomically, by output_files.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional, TextIO

from softprompt_jax.output_files import naming
from softprompt_jax.progress import StatusLine, format_duration, format_rate, is_tty
from softprompt_jax.run_layout import METRICS_FILE
from softprompt_jax.tensorboard_events import EventFile

TRAIN = "train"
# Keys a record sets itself; a metric of the same name would silently overwrite one of them.
RECORD_FIELDS = frozenset({"step", "split", "time", "event", "steps_per_s", "seqs_per_s",
                           "tokens_per_s"})
# TensorBoard tags of train scalars whose JSONL key t5x names otherwise (sequences are examples;
# our tokens count inputs and targets, t5x's `timing/target_tokens_per_second` targets only).
T5X_TAGS = {"steps_per_s": "timing/steps_per_second", "seqs_per_s": "timing/seqs_per_second",
            "tokens_per_s": "timing/tokens_per_second", "cross_entropy": "cross_ent_loss"}


def _scalar(name: str, value) -> int | float:
  """A metric as a JSON number: integers stay integers, everything else (jax/numpy too) floats."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"metric {name!r} must be a scalar number, got {value!r}") from None


def _metrics(metrics: dict) -> dict[str, int | float]:
  clash = RECORD_FIELDS.intersection(metrics)
  if clash:
    raise ValueError(f"metric names {sorted(clash)} are reserved for the record's own fields")
  return {name: _scalar(name, value) for name, value in metrics.items()}


def _format_metrics(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in metrics.items())


class RunLog:
  """Progress line, JSONL records and TensorBoard scalars of one training run.

  `enabled=False` (non-primary hosts) turns every method into a no-op that touches no file and
  writes nothing to `stream`. On a terminal the progress line is a rich bar redrawn in place (at
  most every `update_every_s`, default 0.2 s; progress.StatusLine); elsewhere (log files, CI) it
  is printed as a plain line at most every `update_every_s` (default 30 s), plus on the first and
  the final step.

  Throughput (steps/s, sequences/s = `batch_size` x steps/s, tokens/s) is measured between the
  last `window` `log_train` calls. The first call after start/resume only anchors the
  measurement, so the compilation of the first step is never counted; `log_eval` re-anchors it,
  so time spent evaluating is not counted either. Until there is a measurement the rates are None
  (`null` in JSON); after a re-anchor the last measurement is carried over.

  `learning_rate` (a number, or an optax schedule of the update count) is logged with each train
  point as t5x does, unless the step's metrics hold one: at step s, the rate its last update used
  (a schedule's value at s - 1, as optax counts updates from 0).
  """

  def __init__(self, run_dir, total_steps: int, *, start_step: int = 0, enabled: bool = True,
               tensorboard: bool = True, stream: Optional[TextIO] = None,
               clock: Callable[[], float] = time.perf_counter, window: int = 20,
               update_every_s: float | None = None, tty: bool | None = None,
               batch_size: int | None = None,
               learning_rate: float | Callable[[int], float] | None = None):
    self.enabled = enabled
    self.batch_size, self.learning_rate = batch_size, learning_rate
    self.run_dir = Path(run_dir)
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self._closed = False
    if not enabled:
      return
    if window < 2:
      raise ValueError(f"window must be at least 2 log_train calls, got {window}")
    # Resolved per call, not at import: a replaced sys.stderr (tests, notebooks) is followed.
    self._stream = stream if stream is not None else sys.stderr
    self._clock = clock
    # The stream in use, not the argument: by default (None) that is stderr, a terminal or not.
    tty = tty if tty is not None else is_tty(self._stream)
    self._status = StatusLine(self._stream, tty=tty, every_s=(
        update_every_s if update_every_s is not None else 0.2 if tty else 30.0))
    self._samples = collections.deque(maxlen=window)  # (clock time, step, tokens so far)
    self._tokens = 0
    self._rates: tuple[float | None, float | None] = (None, None)

    self.run_dir.mkdir(parents=True, exist_ok=True)
    path = self.run_dir / METRICS_FILE
    # A crash mid-write leaves a line without its newline; start a fresh line instead of gluing
    # this run's first record onto that fragment.
    needs_newline = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    self._jsonl_path = path
    with naming(path):
      self._jsonl = open(path, "a", encoding="utf-8")
      if needs_newline:
        self._jsonl.write("\n")
    self._append({"step": self.start_step, "event": "start", "total_steps": self.total_steps,
                   "time": time.time()})

    self._tensorboard = tensorboard
    self._writers: dict[str, EventFile] = {}
    # Unique per writer: event files are named by the second and host and opened with "wb", so
    # two writers started within a second in one directory would clobber each other.
    self._writer_suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"

  # ------------------------------------------------------------------------------------------
  # Public API

  def log_train(self, step: int, metrics: dict[str, float], num_tokens: int) -> None:
    """Record one training log point; `num_tokens` counts tokens since the previous call."""
    if not self.enabled:
      return
    step = int(step)
    metrics = _metrics(metrics)
    if self.learning_rate is not None and "learning_rate" not in metrics:
      rate = self.learning_rate(step - 1) if callable(self.learning_rate) else self.learning_rate
      metrics["learning_rate"] = _scalar("learning_rate", rate)
    now = self._clock()
    self._tokens += int(num_tokens)
    self._samples.append((now, step, self._tokens))
    self._rates = self._measure() or self._rates
    steps_per_s, tokens_per_s = self._rates
    seqs_per_s = (steps_per_s * self.batch_size
                  if steps_per_s is not None and self.batch_size is not None else None)
    rates = {"steps_per_s": steps_per_s, "seqs_per_s": seqs_per_s, "tokens_per_s": tokens_per_s}
    self._append({"step": step, "split": TRAIN, **metrics, **rates, "time": time.time()})
    writer = self._writer(TRAIN)
    if writer is not None:
      scalars = {**metrics, **{k: v for k, v in rates.items() if v is not None}}
      writer.add_scalars({T5X_TAGS.get(k, k): v for k, v in scalars.items()}, step)
    self._show_progress(step, metrics, now)

  def log_eval(self, step: int, metrics: dict[str, float], split: str = "validation") -> None:
    """Record evaluation metrics of the parameters at `step` on `split`."""
    if not self.enabled:
      return
    if split == TRAIN or not split or os.sep in split or split in (".", ".."):
      raise ValueError(f"eval split {split!r} must be a plain directory name other than "
                       f"{TRAIN!r} (use e.g. 'train_eval' to evaluate on training data)")
    step = int(step)
    metrics = _metrics(metrics)
    self._append({"step": step, "split": split, **metrics, "time": time.time()})
    writer = self._writer(split)
    if writer is not None:
      writer.add_scalars(metrics, step)
      writer.flush()  # evaluations are rare and the ones worth seeing right away
    self.message(f"{split} @ step {step}: {_format_metrics(metrics)}")
    # Restart the throughput measurement at the next log_train, excluding the evaluation time.
    self._samples.clear()

  def message(self, text: str) -> None:
    """A line on the stream; on a terminal above the progress line."""
    if not self.enabled:
      return
    self._status.print(text)

  def close(self) -> None:
    """Flushes and closes every file, each even when another fails. The first failure is
    raised, unless an error is already on its way up (close called from a `finally`): that one
    says what stopped the run, and is not to be replaced by a consequence (a full disk failing
    the last flush too)."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    self._status.end()  # the last progress line stays on screen
    propagating = sys.exc_info()[1] is not None
    first = None
    for path, file in [*((w.path, w) for w in self._writers.values()),
                       (self._jsonl_path, self._jsonl)]:
      try:
        with naming(path):
          file.close()
      except OSError as error:
        first = first or error
    if first is not None and not propagating:
      raise first

  def __enter__(self) -> RunLog:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ------------------------------------------------------------------------------------------
  # Internals

  def _append(self, record: dict) -> None:
    # One write per record, so a crash can only truncate the last line.
    with naming(self._jsonl_path):
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()

  def _writer(self, split: str) -> Optional[EventFile]:
    if not self._tensorboard:
      return None
    if split not in self._writers:
      # purge_step hides what a crashed run logged past the resumed checkpoint, as read_metrics
      # does for the JSONL.
      self._writers[split] = EventFile(self.run_dir / "tensorboard" / split,
                                       purge_step=self.start_step + 1, suffix=self._writer_suffix)
    return self._writers[split]

  def _measure(self) -> tuple[float, float] | None:
    if len(self._samples) < 2:
      return None
    (t0, step0, tokens0), (t1, step1, tokens1) = self._samples[0], self._samples[-1]
    if t1 <= t0:
      return None
    return (step1 - step0) / (t1 - t0), (tokens1 - tokens0) / (t1 - t0)

  def _progress_line(self, step: int, metrics: dict) -> str:
    steps_per_s, tokens_per_s = self._rates
    eta = (self.total_steps - step) / steps_per_s if steps_per_s else None
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f"step {step}/{self.total_steps} ({percent:.0f}%)",
             f"{format_rate(steps_per_s)} steps/s",
             f"{format_rate(tokens_per_s)} tokens/s",
             f"ETA {format_duration(eta)}"]
    if "loss" in metrics:
      parts.append(f"loss {metrics['loss']:.4g}")
    return " | ".join(parts)

  def _show_progress(self, step: int, metrics: dict, now: float) -> None:
    if self._status.due(now) or step >= self.total_steps:  # the final step always shows
      self._status.show(self._progress_line(step, metrics), now,
                        fraction=step / self.total_steps if self.total_steps else 1.0)


def _last_byte(path: Path) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


# --------------------------------------------------------------------------------------------
# Reading back


def read_metrics(run_dir, split: str | None = None, *, raw: bool = False) -> list[dict]:
  """The records of `run_dir/metrics.jsonl` in file order ([] when there is no file).

  By default: metric records only (start markers dropped), without those a restart superseded
  (logged past the step the run resumed from), and only `split`'s when given. `raw=True` returns
  every parsed line as is. A line cut short by a crash (the last one, or one followed by a start
  marker) is skipped silently; any other unparseable line is skipped with a warning.
  """
  path = Path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  records, bad = [], None  # bad: line number of an unparseable line not yet explained
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
      except ValueError:
        if bad is not None:
          _warn_bad_line(path, bad)
        bad = number
        continue
      if bad is not None and record.get("event") != "start":
        _warn_bad_line(path, bad)
      bad = None
      records.append(record)
  if raw:
    return records
  kept = []
  for record in records:
    if record.get("event") == "start":
      resumed = record.get("step", 0)
      kept = [r for r in kept if r.get("step", 0) <= resumed]
    elif "split" in record:
      kept.append(record)
  return [r for r in kept if split is None or r["split"] == split]


def _warn_bad_line(path: Path, number: int) -> None:
  warnings.warn(f"{path}:{number}: skipping a line that is not a JSON object", stacklevel=3)


def is_finite(value) -> bool:
  """Whether a record's `value` is a finite number (a metric worth plotting or comparing)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_eval(run_dir, metric: str, mode: str, *,
              split: str = "validation") -> tuple[int, float] | None:
  """(step, value) of the best finite `metric` on `split`, earliest on ties; None if none."""
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  best = None
  for record in read_metrics(run_dir, split):
    value = record.get(metric)
    if not is_finite(value):
      continue
    if best is None or (value > best[1] if mode == "max" else value < best[1]):
      best = (record["step"], value)
  return best
