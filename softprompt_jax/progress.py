"""Progress on stderr: one status line, throttled, redrawn in place on a terminal.

`StatusLine` is the display both kinds of progress share: at most one line every interval,
redrawn with `\\r` on a terminal and printed as a plain line elsewhere (log files, CI), with
messages printed above it. `Progress` counts a long pass over examples (evaluation, inference):
done / total, rate, ETA, and a final line with the elapsed time; nothing for a pass shorter than
one interval (on a terminal at most every second, elsewhere every 10 s). Only process 0 prints;
never stdout, which may carry predictions. The training loop's line is RunLog's (run_log).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO

from softprompt_jax import partitioning

TTY_EVERY_S = 1.0
PLAIN_EVERY_S = 10.0
_ERASE_TO_END = "\x1b[K"  # what a longer line drawn before left behind


def format_duration(seconds: Optional[float]) -> str:
  """`--` when unknown, else two units at most: 59s, 1m01s, 1h02m, 1d01h."""
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


def format_rate(rate: Optional[float]) -> str:
  """Three significant digits with a k/M suffix: 0.351, 12.3, 45.6k, 1.2M."""
  if rate is None:
    return "--"
  for bound, suffix in ((1e6, "M"), (1e3, "k")):
    if rate >= bound:
      return f"{rate / bound:.3g}{suffix}"
  return f"{rate:.3g}"


def is_tty(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty()) if isatty is not None else False
  except ValueError:  # a closed stream
    return False


class StatusLine:
  """A line of status on `stream`, shown when `due` (`every_s` after the last one; at once
  when `last_shown` is None): on a terminal (`tty`) redrawn in place, elsewhere one plain line
  each time."""

  def __init__(self, stream: TextIO, *, tty: bool, every_s: float,
               last_shown: Optional[float] = None):
    self._stream, self.tty, self._every_s = stream, tty, every_s
    self._last_shown = last_shown
    self.line = ""  # the last line shown since `end`, "" when none

  def due(self, now: float) -> bool:
    return self._last_shown is None or now - self._last_shown >= self._every_s

  def show(self, line: str, now: float) -> None:
    self._stream.write(f"\r{line}{_ERASE_TO_END}" if self.tty else f"{line}\n")
    self._stream.flush()
    self._last_shown, self.line = now, line

  def print(self, text: str) -> None:
    """`text` on a line of its own; on a terminal the status line is redrawn below it."""
    redraw = self.tty and self.line
    self._stream.write(f"\r{_ERASE_TO_END}{text}\n{self.line}{_ERASE_TO_END}" if redraw
                       else f"{text}\n")
    self._stream.flush()

  def end(self) -> None:
    """Leaves the last line on screen, the cursor on a fresh line."""
    if self.tty and self.line:
      self._stream.write("\n")
      self._stream.flush()
    self.line = ""


class Progress:
  """`update(done)` after each batch; reaching `total` closes it, as do `close()` and leaving
  a `with` block.

  `label` starts the line ("eval validation", "infer"); `total` may be None when unknown. The
  rate is measured from the first update on, so the first batch's compilation is not counted.
  """

  def __init__(self, label: str, total: Optional[int], *, unit: str = "examples",
               stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
               clock: Callable[[], float] = time.perf_counter,
               update_every_s: Optional[float] = None, tty: Optional[bool] = None):
    if enabled is None:
      enabled = partitioning.is_primary_process()
    self.enabled = enabled
    self.label, self.total, self.unit = label, total, unit
    stream = stream if stream is not None else sys.stderr
    tty = tty if tty is not None else is_tty(stream)
    self._clock = clock
    self._start = clock()
    self._anchor: Optional[tuple[float, int]] = None  # (time, done) at the first update
    # Nothing before one interval has passed.
    self._status = StatusLine(stream, tty=tty, last_shown=self._start, every_s=(
        update_every_s if update_every_s is not None else TTY_EVERY_S if tty else PLAIN_EVERY_S))
    self.done = 0

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close(finished=exc_info[0] is None)

  def update(self, done: int) -> None:
    """`done` examples so far (of `total`)."""
    self.done = int(done)
    if not self.enabled:
      return
    now = self._clock()
    if self._anchor is None:
      self._anchor = (now, self.done)
    if self.total is not None and self.done >= self.total:
      self.close()
    elif self._status.due(now):
      self._status.show(self._line(now), now)

  def close(self, finished: bool = True) -> None:
    """Ends the line: after anything was shown, a final line (with the elapsed time when
    `finished`); on a terminal the cursor is left on a fresh line."""
    if not self.enabled or not self._status.line:
      return
    if finished:
      now = self._clock()
      self._status.show(self._line(now, final=True), now)
    self._status.end()

  # ------------------------------------------------------------------------------------------

  def _rate(self, now: float) -> Optional[float]:
    if self._anchor is None or now <= self._anchor[0] or self.done <= self._anchor[1]:
      return None
    return (self.done - self._anchor[1]) / (now - self._anchor[0])

  def _line(self, now: float, final: bool = False) -> str:
    rate = self._rate(now)
    count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
    parts = [f"{self.label}: {count} {self.unit}"
             + (f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""),
             f"{format_rate(rate)} {self.unit}/s"]
    if final:
      parts.append(f"in {format_duration(now - self._start)}")
    elif self.total is not None:
      eta = (self.total - self.done) / rate if rate else None
      parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)

