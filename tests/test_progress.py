"""Progress on a terminal (a rich bar redrawn in place, messages above it, displays stacked) and
elsewhere (plain lines); the pretraining script's progress.

What a terminal shows is read back by `Screen`, a small emulator of the controls rich writes,
so the tests check what the user sees, not rich's exact bytes."""

import importlib.util
import io
import pathlib
import re
import sys

import pytest

from softprompt_jax import progress
from softprompt_jax.run_log import RunLog

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny.py"
CONTROL = re.compile(r"\r|\n|\x1b\[(\??)([\d;]*)([A-Za-z])")


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class TtyStream(io.StringIO):
  def isatty(self):
    return True


class Screen:
  """The lines a terminal shows after `output`: text overwrites at the cursor; \\r, \\n,
  erase line (K), cursor up (A), colours (m, ignored) and cursor show/hide (?25h/l)."""

  def __init__(self, output: str):
    self.lines, self.cursor_visible = [""], True
    row = col = 0
    position = 0
    for match in [*CONTROL.finditer(output), None]:
      text = output[position:match.start() if match else len(output)]
      line = self.lines[row].ljust(col)
      self.lines[row] = line[:col] + text + line[col + len(text):]
      col += len(text)
      if match is None:
        break
      position = match.end()
      private, number, command = match.group(1), match.group(2), match.group(3)
      if match.group() == "\r":
        col = 0
      elif match.group() == "\n":
        row, col = row + 1, 0
        self.lines += [""] * (row + 1 - len(self.lines))
      elif private:
        assert (number, command) in (("25", "l"), ("25", "h")), match.group()
        self.cursor_visible = command == "h"
      elif command == "K":
        self.lines[row] = "" if number == "2" else self.lines[row][:col]
      elif command == "A":
        row = max(row - int(number or 1), 0)
      else:
        assert command == "m", f"unexpected control {match.group()!r}"

  @property
  def text(self) -> list[str]:
    """Non-empty lines, trailing spaces dropped."""
    return [line.rstrip() for line in self.lines if line.strip()]


@pytest.fixture(autouse=True)
def _terminal(monkeypatch):
  """A capable terminal, wide enough that no line is cut."""
  monkeypatch.setenv("TERM", "xterm-256color")
  monkeypatch.setenv("COLUMNS", "200")
  before = list(progress._LIVE)
  yield
  left_on = [status for status in progress._LIVE if status not in before]
  for status in reversed(left_on):
    status.end()
  assert not left_on  # every display the test started was ended


def _bar(line: str) -> str:
  """`line` with its bar's characters replaced by one `#`."""
  return re.sub(r"[━╸╺]+", "#", line)


def test_screen_reads_what_a_terminal_shows():
  screen = Screen("\x1b[?25labc\r\x1b[2Kxy\n\x1b[38;5;70mz\x1b[0m\x1b[1A\x1b[2Kq\rw\n")
  assert screen.text == ["wq", "z"] and screen.cursor_visible is False


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place_with_rate_and_eta():
  clock, stream = FakeClock(), TtyStream()
  shown = progress.Progress("infer", 1000, stream=stream, clock=clock, enabled=True)
  clock.now += 30.0  # the first batch compiles: not counted in the rate
  shown.update(100)
  screen = Screen(stream.getvalue())
  assert [_bar(line) for line in screen.text] == [
      "infer # 100/1000 examples (10%) | -- examples/s | ETA --"]
  assert not screen.cursor_visible  # rich hides it while it draws
  clock.now += 0.5
  before = stream.getvalue()
  shown.update(150)  # within a second of the last line: not drawn
  assert stream.getvalue() == before
  clock.now += 0.5
  shown.update(200)  # 100 examples in 1 s since the first batch: 800 left, 8 s
  redraw = stream.getvalue()[len(before):]
  assert redraw.startswith("\r\x1b[2K")  # the line is erased and drawn again, not appended
  screen = Screen(stream.getvalue())
  assert [_bar(line) for line in screen.text] == [
      "infer # 200/1000 examples (20%) | 100 examples/s | ETA 8s"]
  assert screen.text[0].count("━") + screen.text[0].count("╸") + screen.text[0].count(
      "╺") == progress.BAR_WIDTH
  clock.now += 8.0
  shown.update(1000)  # done: a final line with the elapsed time, the cursor shown again
  screen = Screen(stream.getvalue())
  assert [_bar(line) for line in screen.text] == [
      "infer # 1000/1000 examples (100%) | 100 examples/s | in 39s"]
  assert screen.cursor_visible and stream.getvalue().endswith("\n\x1b[?25h")


def test_run_log_on_a_terminal_shows_rates_and_eta_without_the_compile_step(tmp_path):
  clock, stream = FakeClock(), TtyStream()
  log = RunLog(tmp_path, 1000, stream=stream, clock=clock, tensorboard=False, update_every_s=0)
  clock.now += 60.0  # the first step compiles; counting it would give ~0.05 steps/s
  log.log_train(1, {"loss": 2.5}, 512)
  assert [_bar(line) for line in Screen(stream.getvalue()).text] == [
      "# step 1/1000 (0%) | -- steps/s | -- tokens/s | ETA -- | loss 2.5"]
  for step in range(2, 101):
    clock.now += 0.25
    log.log_train(step, {"loss": 0.125}, 512)
  # Window of 20 calls at 0.25 s a step: 4 steps/s; 900 steps left.
  bar = "# step 100/1000 (10%) | 4 steps/s | 2.05k tokens/s | ETA 3m45s | loss 0.125"
  assert [_bar(line) for line in Screen(stream.getvalue()).text] == [bar]
  log.message("hello [bold]not markup[/bold]")
  assert [_bar(line) for line in Screen(stream.getvalue()).text] == [
      "hello [bold]not markup[/bold]", bar]  # printed above, the bar redrawn below
  log.close()
  screen = Screen(stream.getvalue())
  assert [_bar(line) for line in screen.text] == ["hello [bold]not markup[/bold]", bar]
  assert screen.cursor_visible and stream.getvalue().endswith("\n\x1b[?25h")


def test_an_evaluation_during_training_stacks_below_the_training_bar(tmp_path):
  clock, stream = FakeClock(), TtyStream()
  log = RunLog(tmp_path, 100, stream=stream, clock=clock, tensorboard=False, update_every_s=0)
  for step in (1, 2):
    clock.now += 1.0
    log.log_train(step, {"loss": 1.0}, 10)
  with progress.Progress("eval validation", 40, stream=stream, clock=clock,
                         enabled=True) as shown:
    for done in (10, 20):
      clock.now += 2.0
      shown.update(done)
    assert [_bar(line) for line in Screen(stream.getvalue()).text] == [
        "# step 2/100 (2%) | 1 steps/s | 10 tokens/s | ETA 1m38s | loss 1",
        "eval validation # 20/40 examples (50%) | 5 examples/s | ETA 4s"]
    clock.now += 2.0
    shown.update(40)
  log.log_eval(2, {"accuracy": 0.5})
  clock.now += 1.0
  log.log_train(3, {"loss": 0.5}, 10)
  log.close()
  # The finished evaluation's line stays above; one training bar, not a copy per redraw.
  assert [_bar(line) for line in Screen(stream.getvalue()).text] == [
      "eval validation # 40/40 examples (100%) | 7.5 examples/s | in 6s",
      "validation @ step 2: accuracy 0.5",
      "# step 3/100 (3%) | 1 steps/s | 10 tokens/s | ETA 1m37s | loss 0.5"]


def test_run_log_redraws_on_stderr_and_stderr_prints_above_the_bar(tmp_path, monkeypatch):
  stream = TtyStream()
  monkeypatch.setattr(sys, "stderr", stream)  # the default stream, no `stream=` given
  log = RunLog(tmp_path, 100, tensorboard=False, update_every_s=0)
  log.log_train(1, {"loss": 2.0}, 10)
  log.log_train(2, {"loss": 1.0}, 10)
  assert "\r\x1b[2K" in stream.getvalue()  # redrawn in place
  print("a warning", file=sys.stderr)  # while the bar is on, stderr goes above it
  assert [_bar(line)[:12] for line in Screen(stream.getvalue()).text] == [
      "a warning", "# step 2/100"]
  log.close()
  assert sys.stderr is stream


def test_a_display_left_on_is_ended_at_exit(monkeypatch):
  stream = TtyStream()
  monkeypatch.setattr(sys, "stderr", stream)
  shown = progress.Progress("infer", 10, update_every_s=0, enabled=True)
  shown.update(5)  # an error would leave the pass here, the bar on
  assert sys.stderr is not stream and not Screen(stream.getvalue()).cursor_visible
  progress._end_live_displays()  # what atexit runs
  assert sys.stderr is stream and Screen(stream.getvalue()).cursor_visible


def test_elsewhere_and_on_a_dumb_terminal_lines_are_plain(monkeypatch):
  monkeypatch.setenv("TERM", "dumb")
  clock, stream = FakeClock(), TtyStream()
  assert not progress.is_tty(stream)
  with progress.Progress("pretrain", 30, unit="steps", stream=stream, clock=clock,
                         enabled=True) as shown:
    for step in range(1, 31):
      clock.now += 1.0
      shown.update(step, "loss 0.5")
      if step == 15:
        shown.message("eval at step 15")
  assert stream.getvalue().splitlines() == [
      "pretrain: 10/30 steps (33%) | 1 steps/s | ETA 20s | loss 0.5",
      "eval at step 15",
      "pretrain: 20/30 steps (67%) | 1 steps/s | ETA 10s | loss 0.5",
      "pretrain: 30/30 steps (100%) | 1 steps/s | in 30s | loss 0.5"]


@pytest.fixture(scope="module")
def pretrain_script():
  spec = importlib.util.spec_from_file_location("pretrain_tiny_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("terminal", [False, True])
def test_pretraining_shows_progress_loss_and_evaluations(pretrain_script, terminal):
  clock, stream = FakeClock(), TtyStream() if terminal else io.StringIO()

  def step_fn(state, step):
    clock.now += 0.5
    return state + 1, {"loss": 1.0 / step}

  def evaluate_fn(state, step):
    return f"eval at step {step}:\n  with_instruction  count=12.0"

  state, history = pretrain_script.train_steps(
      step_fn, 0, steps=60, log_every=20, eval_every=40, evaluate_fn=evaluate_fn,
      stream=stream, clock=clock)
  assert state == 60 and [h["step"] for h in history] == [20, 40, 60]
  lines = [_bar(line) for line in Screen(stream.getvalue()).text]
  assert lines[-1].startswith("pretrain")  # the final line, below every message
  assert lines[-1].endswith("60/60 steps (100%) | 2 steps/s | in 30s | loss 0.0201")
  messages = [line for line in lines if not line.startswith("pretrain")]
  assert messages == ["step 20: loss 0.1799  0.500 s/step  elapsed 10 s",
                      "step 40: loss 0.0340  0.500 s/step  elapsed 20 s",
                      "eval at step 40:", "  with_instruction  count=12.0",
                      "step 60: loss 0.0201  0.500 s/step  elapsed 30 s"]
  if not terminal:  # plain lines every 10 s
    assert [line.split(" |")[0] for line in lines if line.startswith("pretrain")] == [
        "pretrain: 20/60 steps (33%)", "pretrain: 40/60 steps (67%)",
        "pretrain: 60/60 steps (100%)"]
