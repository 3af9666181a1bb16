"""RunLog's JSONL/TensorBoard/progress output, and reading it back: curves, best eval, summary.
(Its progress line on a terminal: test_progress.)"""

import io
import json
import re
import struct
import warnings

import pytest
from tensorboardX.proto import event_pb2

from softprompt_jax import progress
from softprompt_jax.curves import plot_curves
from softprompt_jax.run_log import RunLog, best_eval, read_metrics
from softprompt_jax.run_summary import write_summary


class FakeClock:
  """A clock that moves only when told, so throughput and ETA are exact."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class TtyStream(io.StringIO):
  def isatty(self):
    return True


def _lines(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(log_dir):
  """(tag, step, value) of every scalar in the event files under `log_dir`, parsed by hand.

  TFRecord framing: uint64 length, uint32 crc of the length, the Event proto, uint32 crc.
  """
  scalars = []
  files = sorted(log_dir.glob("events.out.tfevents.*"))
  assert files, f"no event file in {log_dir}"
  for path in files:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def _train(log, steps, clock, seconds_per_step=0.5, tokens_per_step=1000, loss=lambda s: 1 / s):
  for step in steps:
    clock.now += seconds_per_step
    log.log_train(step, {"loss": loss(step)}, tokens_per_step)


def test_jsonl_records_train_and_eval_and_resume_appends(tmp_path):
  clock = FakeClock()
  with RunLog(tmp_path, 10, stream=io.StringIO(), clock=clock, tensorboard=False,
              batch_size=8, learning_rate=0.3) as log:
    _train(log, range(1, 5), clock)
    log.log_eval(4, {"accuracy": 0.5})
  first = _lines(tmp_path)
  assert first[0]["event"] == "start" and first[0]["step"] == 0
  train = [r for r in first if r.get("split") == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  # The first step only anchors the measurement.
  assert train[0]["steps_per_s"] is None and train[0]["seqs_per_s"] is None
  assert train[-1]["loss"] == pytest.approx(0.25)
  assert train[-1]["steps_per_s"] == pytest.approx(2.0)
  assert train[-1]["seqs_per_s"] == pytest.approx(16.0)  # 8 sequences a step
  assert train[-1]["tokens_per_s"] == pytest.approx(2000.0)
  assert [r["learning_rate"] for r in train] == [0.3] * 4
  assert set(train[-1]) == {"step", "split", "loss", "learning_rate", "steps_per_s",
                            "seqs_per_s", "tokens_per_s", "time"}
  assert first[-1] == {"step": 4, "split": "validation", "accuracy": 0.5,
                       "time": first[-1]["time"]}

  # Resume from a checkpoint at step 2: steps 3 and 4 run again and the file grows.
  with RunLog(tmp_path, 10, start_step=2, stream=io.StringIO(), clock=clock,
              tensorboard=False) as log:
    _train(log, range(3, 6), clock, loss=lambda s: 10.0 * s)
  lines = _lines(tmp_path)
  assert lines[:len(first)] == first
  assert lines[len(first)] == {"step": 2, "event": "start", "total_steps": 10,
                               "time": lines[len(first)]["time"]}
  assert len(lines) == len(first) + 4

  raw = read_metrics(tmp_path, raw=True)
  assert raw == lines
  current = read_metrics(tmp_path)  # what the resumed run superseded is gone
  assert [(r["split"], r["step"], r["loss"]) for r in current] == [
      ("train", 1, 1.0), ("train", 2, 0.5), ("train", 3, 30.0), ("train", 4, 40.0),
      ("train", 5, 50.0)]
  assert read_metrics(tmp_path, "validation") == []


def test_truncated_last_line_is_skipped_and_the_next_run_starts_a_fresh_line(tmp_path):
  clock = FakeClock()
  with RunLog(tmp_path, 10, stream=io.StringIO(), clock=clock, tensorboard=False) as log:
    _train(log, range(1, 4), clock)
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 4, "split": "train", "loss": 0.2')  # crash mid-write
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]

    with RunLog(tmp_path, 10, start_step=3, stream=io.StringIO(), clock=clock,
                tensorboard=False) as log:
      _train(log, [4], clock, loss=lambda s: 7.0)
    # The fragment stays in the file, on its own line, and is still skipped silently.
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][-2:] == [(3, 1 / 3), (4, 7.0)]

  with open(path, "a") as f:  # corruption that no crash explains is worth a warning
    f.write('garbage in the middle\n{"step": 5, "split": "train", "loss": 1.0}\n')
  with pytest.warns(UserWarning, match="not a JSON object"):
    assert read_metrics(tmp_path)[-1]["step"] == 5


def test_tensorboard_event_files_hold_the_scalars_under_t5x_names(tmp_path):
  clock = FakeClock()
  with RunLog(tmp_path, 10, stream=io.StringIO(), clock=clock, batch_size=32,
              learning_rate=0.3) as log:
    _train(log, range(1, 4), clock)
    log.log_eval(3, {"accuracy": 0.75, "loss": 0.9})
    log.log_eval(3, {"accuracy": 0.5}, split="test")
  train = _events(tmp_path / "tensorboard" / "train")
  assert {tag for tag, _, _ in train} == {
      "loss", "learning_rate", "timing/steps_per_second", "timing/seqs_per_second",
      "timing/tokens_per_second"}
  assert [(s, v) for tag, s, v in train if tag == "loss"] == [
      (1, pytest.approx(1.0)), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
  assert [(s, v) for tag, s, v in train if tag == "learning_rate"] == [
      (1, pytest.approx(0.3)), (2, pytest.approx(0.3)), (3, pytest.approx(0.3))]
  # Rates from the second point on: the first only anchors the measurement.
  assert [(s, v) for tag, s, v in train if tag == "timing/steps_per_second"] == [
      (2, pytest.approx(2.0)), (3, pytest.approx(2.0))]
  assert [(s, v) for tag, s, v in train if tag == "timing/seqs_per_second"] == [
      (2, pytest.approx(32 * 2.0)), (3, pytest.approx(32 * 2.0))]  # batch x steps/s
  assert [(s, v) for tag, s, v in train if tag == "timing/tokens_per_second"] == [
      (2, pytest.approx(2000.0)), (3, pytest.approx(2000.0))]
  validation = _events(tmp_path / "tensorboard" / "validation")
  assert sorted(validation) == [("accuracy", 3, 0.75), ("loss", 3, pytest.approx(0.9))]
  assert _events(tmp_path / "tensorboard" / "test") == [("accuracy", 3, 0.5)]


def test_learning_rate_follows_a_schedule_and_the_step_s_own_wins(tmp_path):
  clock = FakeClock()
  # optax counts updates from 0: step s is update s - 1's result.
  with RunLog(tmp_path, 10, stream=io.StringIO(), clock=clock,
              learning_rate=lambda count: 0.1 * (count + 1)) as log:
    _train(log, range(1, 4), clock)
    log.log_train(4, {"loss": 1.0, "learning_rate": 0.5, "cross_entropy": 0.9,
                      "accuracy": 0.25}, 100)
  train = _events(tmp_path / "tensorboard" / "train")
  assert [(s, v) for tag, s, v in train if tag == "learning_rate"] == [
      (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3)),
      (4, pytest.approx(0.5))]
  # t5x's names: cross_ent_loss; accuracy as it is; no seqs/s without a batch size.
  at_4 = {tag: v for tag, s, v in train if s == 4}
  assert at_4["cross_ent_loss"] == pytest.approx(0.9) and at_4["accuracy"] == 0.25
  assert not {tag for tag, _, _ in train} & {"cross_entropy", "timing/seqs_per_second"}
  assert read_metrics(tmp_path)[-1]["cross_entropy"] == pytest.approx(0.9)  # JSONL: our names


def test_progress_lines_elsewhere_are_periodic_and_eval_time_is_not_throughput(tmp_path):
  clock, stream = FakeClock(), io.StringIO()
  with RunLog(tmp_path, 40, stream=stream, clock=clock, tensorboard=False,
              update_every_s=5) as log:
    _train(log, range(1, 21), clock, seconds_per_step=1.0)  # shown at steps 1, 6, 11, 16
    clock.now += 1000.0  # a long evaluation
    log.log_eval(20, {"accuracy": 0.5})
    _train(log, range(21, 41), clock, seconds_per_step=1.0)
  lines = stream.getvalue().splitlines()
  steps = [int(m.group(1)) for m in map(re.compile(r"^step (\d+)/40").match, lines) if m]
  assert steps == [1, 6, 11, 16, 21, 26, 31, 36, 40]  # the final step always shows
  assert "validation @ step 20: accuracy 0.5" in lines
  assert all("| 1 steps/s |" in line for line in lines if line.startswith("step 40/"))
  train = read_metrics(tmp_path, "train")
  assert [r["steps_per_s"] for r in train[20:]] == [pytest.approx(1.0)] * 20


def test_disabled_log_writes_nothing(tmp_path):
  stream, run_dir = TtyStream(), tmp_path / "run"
  with RunLog(run_dir, 10, enabled=False, stream=stream) as log:
    log.log_train(1, {"loss": 1.0}, 10)
    log.log_eval(1, {"accuracy": 1.0})
    log.message("hi")
  assert not run_dir.exists()
  assert stream.getvalue() == ""


def test_bad_metric_names_and_splits_are_rejected(tmp_path):
  with RunLog(tmp_path, 10, stream=io.StringIO(), tensorboard=False) as log:
    with pytest.raises(ValueError, match="reserved"):
      log.log_train(1, {"step": 3}, 10)
    with pytest.raises(ValueError, match="split"):
      log.log_eval(1, {"accuracy": 1.0}, split="train")


def _run_with_evals(run_dir, accuracies, losses):
  clock = FakeClock()
  with RunLog(run_dir, 100, stream=io.StringIO(), clock=clock, tensorboard=False) as log:
    for i, (accuracy, loss) in enumerate(zip(accuracies, losses)):
      step = 10 * (i + 1)
      _train(log, range(step - 9, step + 1), clock)
      log.log_eval(step, {"accuracy": accuracy, "loss": loss})


def test_best_eval_picks_the_step_for_max_and_min(tmp_path):
  assert best_eval(tmp_path, "accuracy", "max") is None
  _run_with_evals(tmp_path, [0.5, 0.8, float("nan"), 0.8, 0.7], [3.0, 2.0, 2.5, 1.5, 1.7])
  assert best_eval(tmp_path, "accuracy", "max") == (20, 0.8)  # NaN skipped, earliest tie
  assert best_eval(tmp_path, "accuracy", "min") == (10, 0.5)
  assert best_eval(tmp_path, "loss", "min") == (40, 1.5)
  assert best_eval(tmp_path, "loss", "min", split="test") is None
  with pytest.raises(ValueError, match="mode"):
    best_eval(tmp_path, "loss", "lowest")


def test_plot_curves_writes_a_png(tmp_path):
  _run_with_evals(tmp_path, [0.5, 0.8, 0.7], [3.0, 2.0, 1.7])
  path = plot_curves(tmp_path)
  assert path == tmp_path / "curves.png"
  data = path.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
  width, height = struct.unpack(">II", data[16:24])  # IHDR
  assert (width, height) == (1100, 400)

  other = plot_curves(tmp_path, tmp_path / "plots" / "acc.png", metric="accuracy")
  assert other.read_bytes().startswith(b"\x89PNG")
  with pytest.raises(ValueError, match="accuracy"):
    plot_curves(tmp_path, metric="acuracy")
  assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["curves.png"]


def test_plot_curves_before_any_evaluation(tmp_path):
  clock = FakeClock()
  with RunLog(tmp_path, 10, stream=io.StringIO(), clock=clock, tensorboard=False) as log:
    _train(log, range(1, 4), clock)
  assert plot_curves(tmp_path, metric="accuracy").stat().st_size > 0


def test_write_summary_is_valid_json_and_prints_the_highlights(tmp_path):
  import numpy as np
  stream = io.StringIO()
  summary = {"steps": 1000, "wall_time_s": 3725.0, "final_loss": np.float32(0.125),
             "best_metric": "validation/accuracy", "best_value": 0.8125, "best_step": 900,
             "config": {"lr": 0.3}, "run_dir": tmp_path}
  path = write_summary(tmp_path, summary, stream=stream)
  assert path == tmp_path / "summary.json"
  assert json.loads(path.read_text()) == {**summary, "final_loss": 0.125, "run_dir": str(tmp_path)}
  out = stream.getvalue()
  assert out.count("\n") == 1
  for part in ("1000 steps", "wall time 1h02m", "final loss 0.125",
               "best validation/accuracy 0.8125 at step 900"):
    assert part in out
  write_summary(tmp_path, {"steps": 5}, stream=stream)  # replaces the file, leaves no temp
  assert json.loads(path.read_text()) == {"steps": 5}
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
  with pytest.raises(TypeError):
    write_summary(tmp_path, {"bad": object()}, stream=stream)
  assert json.loads(path.read_text()) == {"steps": 5}


def test_duration_and_rate_formats():
  assert [progress.format_duration(s) for s in (None, 0, 59.4, 61, 3725, 90000)] == [
      "--", "0s", "59s", "1m01s", "1h02m", "1d01h"]
  assert [progress.format_rate(r) for r in (None, 0.3512, 12.34, 45600, 1.2e6)] == [
      "--", "0.351", "12.3", "45.6k", "1.2M"]
