"""Progress on stderr: a rich live bar on a terminal, plain throttled lines elsewhere.

`StatusLine` is the display every kind of progress shares (training's RunLog line, evaluation,
inference, pretraining). On a terminal it is a rich `Live` display, a bar and the status text
redrawn in place, with messages printed above it; displays on the same terminal at once (an
evaluation during training) share one rich console and stack, one line each. Elsewhere (log
files, CI, pipes, a dumb terminal) each update is one plain line. `Progress` counts a long pass
(evaluation, inference, pretraining steps): done / total, rate, ETA, and a final line with the
elapsed time; nothing for a pass shorter than one interval (on a terminal at most every second,
elsewhere every 10 s). Only process 0 prints; never stdout, which may carry predictions.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from typing import Callable, Optional, TextIO

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from softprompt_jax import partitioning

TTY_EVERY_S = 1.0
PLAIN_EVERY_S = 10.0
BAR_WIDTH = 30


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
  """Whether `stream` is a terminal that takes cursor control (a dumb one gets plain lines)."""
  isatty = getattr(stream, "isatty", None)
  try:
    terminal = bool(isatty()) if isatty is not None else False
  except ValueError:  # a closed stream
    return False
  return terminal and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")


# Per terminal stream, the rich console its live displays share while any is on, and how many
# are: two consoles on one terminal would each move the cursor over the other's lines.
_CONSOLES: dict[int, tuple[Console, int]] = {}
_LIVE: list[StatusLine] = []  # live displays, oldest first; those still on are ended at exit


def _console(stream: TextIO, users: int = 0) -> Optional[Console]:
  """The live console of `stream` (None when none), its user count changed by `users`; one is
  made when `users` > 0 finds none."""
  console, count = _CONSOLES.get(id(stream), (None, 0))
  if console is None and users > 0:
    console = Console(file=stream, force_terminal=True, highlight=False, emoji=False)
  if users:
    count += users
    if count > 0:
      _CONSOLES[id(stream)] = (console, count)
    else:
      _CONSOLES.pop(id(stream), None)
  return console


@atexit.register
def _end_live_displays() -> None:
  """A display its owner never ended (an error left a pass early) would leave the terminal's
  cursor hidden and stderr redirected; the newest first, as rich stacks them."""
  for status in reversed(list(_LIVE)):
    status.end()


def _renderable(label: str, text: str, fraction: Optional[float]):
  grid = Table.grid(padding=(0, 1))
  row = [Text(label)] if label else []
  if fraction is not None:
    row.append(ProgressBar(total=1.0, completed=min(max(fraction, 0.0), 1.0), width=BAR_WIDTH))
  # One line whatever the terminal's width: the text is cut, not wrapped.
  row.append(Text(text, no_wrap=True, overflow="ellipsis"))
  grid.add_row(*row)
  return grid


class StatusLine:
  """A line of status on `stream`, shown when `due` (`every_s` after the last one; at once
  when `last_shown` is None): on a terminal (`tty`) a live bar redrawn in place, elsewhere one
  plain line each time."""

  def __init__(self, stream: TextIO, *, tty: bool, every_s: float,
               last_shown: Optional[float] = None):
    # While a live display redirects stderr, sys.stderr is rich's proxy of the real stream.
    self._stream = getattr(stream, "rich_proxied_file", stream)
    self.tty, self._every_s = tty, every_s
    self._last_shown = last_shown
    self._live: Optional[Live] = None
    self.line = ""  # the last line shown since `end`, "" when none

  def due(self, now: float) -> bool:
    return self._last_shown is None or now - self._last_shown >= self._every_s

  def show(self, text: str, now: float, *, label: str = "",
           fraction: Optional[float] = None) -> None:
    """`text` after `label`; on a terminal with a bar filled to `fraction` (none when None)."""
    self._last_shown, self.line = now, f"{label}: {text}" if label else text
    if not self.tty:
      self._write(self.line)
      return
    if self._live is None:
      # stdout is never redirected: it may carry predictions. Redirected stderr (warnings, a
      # traceback) prints above the bar instead of through it.
      self._live = Live(console=_console(self._stream, +1), auto_refresh=False,
                        redirect_stdout=False, redirect_stderr=self._stream is sys.stderr)
      _LIVE.append(self)
      self._live.start()
    self._live.update(_renderable(label, text, fraction), refresh=True)

  def print(self, text: str) -> None:
    """`text` on a line of its own; on a terminal above the live displays."""
    console = _console(self._stream) if self.tty else None
    if console is None:
      self._write(text)
    else:
      console.print(text, markup=False, soft_wrap=True)

  def end(self) -> None:
    """Leaves the last line on screen, the cursor (shown again) on a fresh line."""
    live, self._live = self._live, None
    if live is not None:
      _LIVE.remove(self)
      try:
        live.stop()
      finally:
        _console(self._stream, -1)
      # A stacked display's last line is printed above the others, which are redrawn without it.
      for other in _LIVE:
        if other._stream is self._stream:
          other._live.refresh()
          break
    self.line = ""

  def _write(self, line: str) -> None:
    self._stream.write(f"{line}\n")
    self._stream.flush()


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
    self._note = ""
    # Nothing before one interval has passed.
    self._status = StatusLine(stream, tty=tty, last_shown=self._start, every_s=(
        update_every_s if update_every_s is not None else TTY_EVERY_S if tty else PLAIN_EVERY_S))
    self.done = 0

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close(finished=exc_info[0] is None)

  def update(self, done: int, note: str = "") -> None:
    """`done` examples so far (of `total`); `note` (e.g. "loss 0.25") ends the line."""
    self.done, self._note = int(done), note
    if not self.enabled:
      return
    now = self._clock()
    if self._anchor is None:
      self._anchor = (now, self.done)
    if self.total is not None and self.done >= self.total:
      self.close()
    elif self._status.due(now):
      self._show(now)

  def message(self, text: str) -> None:
    """`text` on a line of its own (on a terminal above the bar)."""
    if self.enabled:
      self._status.print(text)

  def close(self, finished: bool = True) -> None:
    """Ends the line: after anything was shown, a final line (with the elapsed time when
    `finished`); on a terminal the cursor is left on a fresh line."""
    if not self.enabled or not self._status.line:
      return
    if finished:
      self._show(self._clock(), final=True)
    self._status.end()

  # ------------------------------------------------------------------------------------------

  def _rate(self, now: float) -> Optional[float]:
    if self._anchor is None or now <= self._anchor[0] or self.done <= self._anchor[1]:
      return None
    return (self.done - self._anchor[1]) / (now - self._anchor[0])

  def _show(self, now: float, final: bool = False) -> None:
    rate = self._rate(now)
    count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
    parts = [f"{count} {self.unit}"
             + (f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""),
             f"{format_rate(rate)} {self.unit}/s"]
    if final:
      parts.append(f"in {format_duration(now - self._start)}")
    elif self.total is not None:
      eta = (self.total - self.done) / rate if rate else None
      parts.append(f"ETA {format_duration(eta)}")
    if self._note:
      parts.append(self._note)
    self._status.show(" | ".join(parts), now, label=self.label,
                      fraction=self.done / self.total if self.total else None)
