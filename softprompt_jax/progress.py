"""Progress of long passes over examples (evaluation, inference) on stderr: done / total, rate,
ETA.

Throttled: nothing for a pass shorter than one interval, then on a terminal one line redrawn in
place with `\\r` (at most every second) and elsewhere (log files, CI) a plain line at most every
10 s, plus a final line with the elapsed time. Only process 0 prints; never stdout, which may
carry predictions.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

from softprompt_jax.run_log import _format_duration, _format_rate

TTY_EVERY_S = 1.0
PLAIN_EVERY_S = 10.0


def is_tty(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty()) if isatty is not None else False
  except ValueError:  # a closed stream
    return False


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
      from softprompt_jax.partitioning import is_primary_process
      enabled = is_primary_process()
    self.enabled = enabled
    self.label, self.total, self.unit = label, total, unit
    self._stream = stream if stream is not None else sys.stderr
    self._tty = tty if tty is not None else is_tty(self._stream)
    self._every_s = (update_every_s if update_every_s is not None
                     else TTY_EVERY_S if self._tty else PLAIN_EVERY_S)
    self._clock = clock
    self._start = clock()
    self._anchor: Optional[tuple[float, int]] = None  # (time, done) at the first update
    self._last_shown = self._start  # nothing before one interval has passed
    self._shown = False
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
    elif now - self._last_shown >= self._every_s:
      self._last_shown = now
      self._show(self._line(now))

  def close(self, finished: bool = True) -> None:
    """Ends the line: after anything was shown, a final line (with the elapsed time when
    `finished`); on a terminal the cursor is left on a fresh line."""
    if not self.enabled or not self._shown:
      return
    if finished:
      self._show(self._line(self._clock(), final=True))
    if self._tty:
      self._stream.write("\n")
      self._stream.flush()
    self._shown = False

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
             f"{_format_rate(rate)} {self.unit}/s"]
    if final:
      parts.append(f"in {_format_duration(now - self._start)}")
    elif self.total is not None:
      eta = (self.total - self.done) / rate if rate else None
      parts.append(f"ETA {_format_duration(eta)}")
    return " | ".join(parts)

  def _show(self, line: str) -> None:
    # On a terminal: back to the line's start, and erase what a longer line left behind.
    self._stream.write(f"\r{line}\x1b[K" if self._tty else f"{line}\n")
    self._stream.flush()
    self._shown = True
