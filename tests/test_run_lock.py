"""One `train` at a time per run directory: a second one is refused in one line naming the
first, and the lock a killed run leaves behind does not block its resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from softprompt_jax.cli import main
from softprompt_jax.run_lock import LOCK_FILE, RunDirectoryBusy, RunLock

SMOKE = ["--gin_file", "runs/smoke.gin"]


def test_a_second_lock_is_refused_naming_the_holder_and_released_locks_are_gone(tmp_path):
  first = RunLock(tmp_path).acquire()
  with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()} on "):
    RunLock(tmp_path).acquire()
  first.release()
  assert not (tmp_path / LOCK_FILE).exists()
  RunLock(tmp_path).acquire().release()  # free again


def test_second_train_is_refused_and_a_killed_runs_lock_does_not_block_its_resume(tmp_path,
                                                                                 capsys):
  run = tmp_path / "run"
  log = tmp_path / "first.log"
  # A long first run in its own process (its output to a file: a full pipe would stall it).
  with open(log, "w") as out:
    first = subprocess.Popen(
        [sys.executable, "-m", "softprompt_jax", "train", *SMOKE, "--model_dir", str(run),
         "--gin.train.num_steps=100000", "--gin.train.eval_every=10"],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
  try:
    deadline = time.monotonic() + 240
    # It is training, with a checkpoint (which step: older ones are pruned as it goes).
    while not any(p.name.isdigit() for p in (run / "checkpoints").glob("*")):
      assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
      time.sleep(0.5)
    config_before = (run / "config.gin").read_text()
    capsys.readouterr()
    assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.train.num_steps=30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt-jax train: error: "), err
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid and f"pid {first.pid}" in err[0], err[0]
    assert "in use by another train process" in err[0]
    assert (run / "config.gin").read_text() == config_before  # the record was not touched
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert (run / LOCK_FILE).exists()  # the killed run's lock file stays behind...
  # (the killed run got to a step that depends on the machine's speed: resume a little past it)
  end = max(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit()) + 10
  assert main(["train", *SMOKE, "--model_dir", str(run), f"--gin.train.num_steps={end}"]) == 0
  assert json.loads((run / "summary.json").read_text())["steps"] == end  # ...and blocks nothing
  assert not (run / LOCK_FILE).exists()
