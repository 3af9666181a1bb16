"""Training observability: a progress line, `metrics.jsonl`, TensorBoard scalars, curves, summary.

`RunLog` is what the training loop talks to. Every record goes to `run_dir/metrics.jsonl`, one
JSON object a line, flushed as written and appended to across restarts; that file is the record
the other functions here read back. A restart writes a start marker (`{"event": "start", "step":
s, ...}`), and `read_metrics` drops what the crashed run logged past step s, since the resumed run
logs those steps again. TensorBoard gets the same scalars, one subdirectory per split, so train
and validation curves of the same tag overlay.

Every file here is written in the caller's thread, and an OSError names the file (a write() on a
full disk names none), so a full or read-only disk stops the run with one line. Whole files
(summary, curves, the run's gin records) are replaced atomically: whole or not there.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import numbers
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO, Union

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
TRAIN = "train"
# Keys a record sets itself; a metric of the same name would silently overwrite one of them.
_RESERVED = frozenset({"step", "split", "time", "event", "steps_per_s", "tokens_per_s"})


def _scalar(name: str, value) -> int | float:
  """A metric as a JSON number: integers stay integers, everything else (jax/numpy too) floats."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"metric {name!r} must be a scalar number, got {value!r}") from None


def _metrics(metrics: dict) -> dict[str, int | float]:
  clash = _RESERVED.intersection(metrics)
  if clash:
    raise ValueError(f"metric names {sorted(clash)} are reserved for the record's own fields")
  return {name: _scalar(name, value) for name, value in metrics.items()}


def _format_duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "--"
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _format_rate(rate: float | None) -> str:
  """Three significant digits with a k/M suffix: 0.351, 12.3, 45.6k, 1.2M."""
  if rate is None:
    return "--"
  for bound, suffix in ((1e6, "M"), (1e3, "k")):
    if rate >= bound:
      return f"{rate / bound:.3g}{suffix}"
  return f"{rate:.3g}"


def _format_metrics(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in metrics.items())


class RunLog:
  """Progress line, JSONL records and TensorBoard scalars of one training run.

  `enabled=False` (non-primary hosts) turns every method into a no-op that touches no file and
  writes nothing to `stream`. On a TTY the progress line is redrawn in place (at most every
  `update_every_s`, default 0.2 s); elsewhere (log files, CI) it is printed as a plain line at
  most every `update_every_s` (default 30 s), plus on the first and the final step.

  Throughput (steps/s, tokens/s) is measured between the last `window` `log_train` calls. The
  first call after start/resume only anchors the measurement, so the compilation of the first
  step is never counted; `log_eval` re-anchors it, so time spent evaluating is not counted either.
  Until there is a measurement the rates are None (`null` in JSON); after a re-anchor the last
  measurement is carried over.
  """

  def __init__(self, run_dir, total_steps: int, *, start_step: int = 0, enabled: bool = True,
               tensorboard: bool = True, stream: Optional[TextIO] = None,
               clock: Callable[[], float] = time.perf_counter, window: int = 20,
               update_every_s: float | None = None, tty: bool | None = None):
    self.enabled = enabled
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
    self._tty = tty if tty is not None else bool(getattr(self._stream, "isatty", lambda: False)())
    self._update_every_s = (update_every_s if update_every_s is not None
                            else 0.2 if self._tty else 30.0)
    self._samples = collections.deque(maxlen=window)  # (clock time, step, tokens so far)
    self._tokens = 0
    self._rates: tuple[float | None, float | None] = (None, None)
    self._last_shown: float | None = None
    self._bar = ""  # the progress line currently on a TTY, "" when none is drawn

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
    self._writers: dict[str, _EventFile] = {}
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
    now = self._clock()
    self._tokens += int(num_tokens)
    self._samples.append((now, step, self._tokens))
    self._rates = self._measure() or self._rates
    steps_per_s, tokens_per_s = self._rates
    self._append({"step": step, "split": TRAIN, **metrics, "steps_per_s": steps_per_s,
                  "tokens_per_s": tokens_per_s, "time": time.time()})
    writer = self._writer(TRAIN)
    if writer is not None:
      rates = {} if steps_per_s is None else {"steps_per_s": steps_per_s,
                                               "tokens_per_s": tokens_per_s}
      writer.add_scalars({**metrics, **rates}, step)
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
    """A line on the stream; on a TTY the progress line is cleared first and redrawn below it."""
    if not self.enabled:
      return
    if self._tty and self._bar:
      self._stream.write("\r" + " " * len(self._bar) + "\r")
    self._stream.write(f"{text}\n")
    if self._tty and self._bar:
      self._stream.write(self._bar)
    self._stream.flush()

  def close(self) -> None:
    """Flushes and closes every file, each even when another fails. The first failure is
    raised, unless an error is already on its way up (close called from a `finally`): that one
    says what stopped the run, and is not to be replaced by a consequence (a full disk failing
    the last flush too)."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._tty and self._bar:
      self._stream.write("\n")  # leave the last progress line on screen
      self._stream.flush()
      self._bar = ""
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

  def _writer(self, split: str) -> Optional[_EventFile]:
    if not self._tensorboard:
      return None
    if split not in self._writers:
      # purge_step hides what a crashed run logged past the resumed checkpoint, as read_metrics
      # does for the JSONL.
      self._writers[split] = _EventFile(self.run_dir / "tensorboard" / split,
                                        purge_step=self.start_step + 1,
                                        suffix=self._writer_suffix)
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
             f"{_format_rate(steps_per_s)} steps/s",
             f"{_format_rate(tokens_per_s)} tokens/s",
             f"ETA {_format_duration(eta)}"]
    if "loss" in metrics:
      parts.append(f"loss {metrics['loss']:.4g}")
    return " | ".join(parts)

  def _show_progress(self, step: int, metrics: dict, now: float) -> None:
    due = (self._last_shown is None or now - self._last_shown >= self._update_every_s
           or step >= self.total_steps)
    if not due:
      return
    self._last_shown = now
    line = self._progress_line(step, metrics)
    if self._tty:
      # Pad with spaces to wipe the tail of a longer previous line.
      self._stream.write("\r" + line + " " * max(0, len(self._bar) - len(line)))
      self._bar = line
    else:
      self._stream.write(line + "\n")
    self._stream.flush()


class _EventFile:
  """One TensorBoard event file (TFRecord-framed `Event` protos), written in the caller's thread.

  tensorboardX's SummaryWriter writes from a thread of its own: a full disk there is a traceback
  on stderr while training goes on (and its bounded queue, once the thread is dead, blocks
  logging for good). Here a failed write is an OSError where the scalar is logged, naming the
  file. Flushed when asked (evaluations), every `flush_every_s` and on close.
  """

  def __init__(self, directory: Path, *, purge_step: int, suffix: str,
               flush_every_s: float = 30.0):
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # slow; the primary host's only
    from tensorboardX.record_writer import RecordWriter
    from tensorboardX.summary import scalar
    self._event, self._scalar = Event, scalar
    self._flush_every_s = flush_every_s
    self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{suffix}"
    with naming(self.path):
      directory.mkdir(parents=True, exist_ok=True)
      self._records = RecordWriter(str(self.path))
      # As SummaryWriter(purge_step=...) starts a file: TensorBoard then drops the events an
      # earlier file holds from purge_step on.
      self._write(Event(step=purge_step, file_version="brain.Event:2"))
      self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
      self.flush()

  def add_scalars(self, values: dict[str, float], step: int) -> None:
    with naming(self.path):
      for name, value in values.items():
        self._write(self._event(step=int(step), summary=self._scalar(name, value)))
      if time.monotonic() - self._flushed >= self._flush_every_s:
        self.flush()

  def flush(self) -> None:
    with naming(self.path):
      self._records.flush()  # and fsync
    self._flushed = time.monotonic()

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._records.close()

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())


@contextlib.contextmanager
def naming(path, *, instead_of_any: bool = False) -> Iterator[None]:
  """An OSError that names no file (a write() or flush on a full disk) gets `path`, so the one
  line the user sees says which file could not be written; `instead_of_any`: also one that
  names another (a temporary file standing in for `path`)."""
  try:
    yield
  except OSError as error:
    path = os.fspath(path)
    if error.errno is None or error.filename == path or (error.filename is not None
                                                         and not instead_of_any):
      raise
    # OSError(errno, ...) is the subclass the errno calls for, as the original was.
    raise OSError(error.errno, error.strerror or os.strerror(error.errno), path) from error


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


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_eval(run_dir, metric: str, mode: str, *,
              split: str = "validation") -> tuple[int, float] | None:
  """(step, value) of the best finite `metric` on `split`, earliest on ties; None if none."""
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  best = None
  for record in read_metrics(run_dir, split):
    value = record.get(metric)
    if not _finite(value):
      continue
    if best is None or (value > best[1] if mode == "max" else value < best[1]):
      best = (record["step"], value)
  return best


# --------------------------------------------------------------------------------------------
# Curves and summary


def _eval_metric_names(records: list[dict]) -> list[str]:
  names = []
  for record in records:
    for name, value in record.items():
      # Counts (num_examples, num_truncated_inputs, …) describe the data, not the prompt.
      if (name not in _RESERVED and not name.startswith("num_") and _finite(value)
          and name not in names):
        names.append(name)
  return names


def plot_curves(run_dir, png_path=None, metric: str | None = None, *,
                train_metric: str = "loss") -> Path:
  """A PNG of the training loss (left) and evaluation curves (right) over steps.

  `metric` picks the evaluation metric plotted for every eval split; None plots all of them.
  Renders with Agg on a bare Figure, so no display is needed and pyplot's global state (and the
  caller's backend) is left alone.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  run_dir = Path(run_dir)
  png_path = Path(png_path) if png_path is not None else run_dir / CURVES_FILE
  records = read_metrics(run_dir)
  train = [r for r in records if r["split"] == TRAIN and _finite(r.get(train_metric))]
  evals = [r for r in records if r["split"] != TRAIN]
  names = _eval_metric_names(evals)
  if metric is not None:
    if evals and metric not in names:
      raise ValueError(f"no evaluation logged {metric!r}; logged metrics: {names}")
    names = [metric]

  figure = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(figure)
  train_axes, eval_axes = figure.subplots(1, 2)
  train_axes.plot([r["step"] for r in train], [r[train_metric] for r in train], linewidth=1)
  train_axes.set(title=f"train {train_metric}", xlabel="step")
  for split in dict.fromkeys(r["split"] for r in evals):
    for name in names:
      points = [(r["step"], r[name]) for r in evals if r["split"] == split and _finite(r.get(name))]
      if points:
        eval_axes.plot(*zip(*points), marker="o", markersize=3, label=f"{split} {name}")
  eval_axes.set(title="evaluation", xlabel="step")
  if eval_axes.lines:
    eval_axes.legend()
  else:
    eval_axes.text(0.5, 0.5, "no evaluations yet", ha="center", va="center",
                   transform=eval_axes.transAxes)
  for axes in (train_axes, eval_axes):
    axes.grid(alpha=0.3)

  image = io.BytesIO()
  figure.savefig(image, format="png", dpi=100)
  write_file(png_path, image.getvalue())  # a viewer never sees a half-written image
  return png_path


def _json_default(value):
  """numpy/jax scalars and arrays, and paths, which `json` cannot serialize on its own."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def write_file(path, data: Union[str, bytes]) -> Path:
  """Writes `path` atomically: a temporary file beside it, fsynced, renamed over it. Whatever
  stops the write (a full disk, a kill), the path holds the old file or the new one, never a
  part, and the temporary file is removed where the disk allows. An OSError names `path`."""
  path = Path(path)
  data = data.encode("utf-8") if isinstance(data, str) else data
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
  with naming(path, instead_of_any=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
      with open(tmp, "xb") as f:  # mode 0o666 less the umask, as a plain open() gives
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename must not land before the data
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
      raise
  return path


def write_summary(run_dir, summary: dict, *, stream: Optional[TextIO] = None) -> Path:
  """Write `run_dir/summary.json` atomically and print a one-line summary of it to `stream`.

  The line shows whichever of these keys `summary` has: "steps", "wall_time_s", "final_loss",
  and "best_metric" with "best_value" and "best_step"; the file holds all of `summary`.
  """
  run_dir = Path(run_dir)
  path = run_dir / SUMMARY_FILE
  text = json.dumps(summary, indent=2, default=_json_default) + "\n"  # fails before any write
  write_file(path, text)

  parts = []
  if "steps" in summary:
    parts.append(f"{summary['steps']} steps")
  if "wall_time_s" in summary:
    parts.append(f"wall time {_format_duration(float(summary['wall_time_s']))}")
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
