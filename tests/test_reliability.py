"""Crash safety of `train`: SIGKILL and resume, damaged or partial checkpoints, NaN/Inf stops.

The runs are configs/runs/smoke.gin (the tiny random model, seconds per run) lengthened to 30
steps so that a kill after the first checkpoint lands mid-run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import gin_setup, optim
from softprompt_jax.checkpoints.state import INTEGRITY_FILE, PromptCheckpoints
from softprompt_jax.cli import main
from softprompt_jax.errors import NumericalError
from softprompt_jax.run_dir import best_prompt

SMOKE = ["--gin_file", "runs/smoke.gin", "--gin.train.num_steps=30"]


def _train_command(run):
  return [sys.executable, "-m", "softprompt_jax", "train", *SMOKE, "--model_dir", str(run)]


def _steps(run):
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: what every interrupted one must end with, bit for bit."""
  run = tmp_path_factory.mktemp("uninterrupted")
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  assert _steps(run) == [20, 30]  # smoke keeps the last two
  return run


def test_sigkill_after_first_checkpoint_then_resume_is_bitwise_identical(reference, tmp_path,
                                                                        capsys):
  run = tmp_path / "killed"
  process = subprocess.Popen(_train_command(run), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  # Step 10's checksums are written last: once they exist, the checkpoint is complete.
  first = run / "checkpoints" / "10" / INTEGRITY_FILE
  deadline = time.time() + 300
  while not first.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (run / "summary.json").exists()

  # The same command resumes it (in this process: a fresh one would only add its start-up).
  capsys.readouterr()
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  assert "resumed from" in capsys.readouterr().err
  np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(reference / "prompt.npy"))


def _copy_run(reference, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  (run / "prompt.npy").unlink()
  (run / "summary.json").unlink()
  return run


def _flip_a_byte(step_dir):
  """Corrupts the biggest file of a checkpoint's state (the array data)."""
  target = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0xFF
  target.write_bytes(bytes(data))
  return target


def test_damaged_newest_checkpoint_is_set_aside_and_training_redoes_its_steps(reference,
                                                                               tmp_path):
  run = _copy_run(reference, tmp_path)
  _flip_a_byte(run / "checkpoints" / "30")
  with pytest.warns(UserWarning, match=r"checkpoint .*30 is damaged \(contents changed"):
    assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  # Nothing is deleted: the damaged step is kept aside, and step 30 was trained again from 20.
  aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("damaged-30-")]
  assert len(aside) == 1
  assert _steps(run) == [20, 30]
  np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(reference / "prompt.npy"))
  log = (run / "metrics.jsonl").read_text()
  assert '"step": 20, "event": "start"' in log


def test_unreadable_checkpoint_without_checksums_is_also_skipped(reference, tmp_path):
  run = _copy_run(reference, tmp_path)
  newest = run / "checkpoints" / "30"
  (newest / INTEGRITY_FILE).unlink()  # as after a crash between orbax's rename and our sums
  shutil.rmtree(newest / "state")
  with pytest.warns(UserWarning, match=r"checkpoint .*30 is damaged \(cannot be restored"):
    assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(reference / "prompt.npy"))


def test_partial_save_from_a_kill_mid_write_is_invisible(reference, tmp_path):
  run = _copy_run(reference, tmp_path)
  # What orbax leaves when killed while writing step 40: a temporary directory, never renamed.
  partial = run / "checkpoints" / "40.orbax-checkpoint-tmp-1763790000000000"
  shutil.copytree(run / "checkpoints" / "30", partial)
  shutil.rmtree(partial / "meta")
  checkpoints = PromptCheckpoints(run / "checkpoints")
  assert checkpoints.steps() == [20, 30]
  checkpoints.close()
  np.testing.assert_array_equal(best_prompt(run), np.load(reference / "prompt.npy"))


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  run = tmp_path / "diverged"
  gin_setup.parse(["runs/smoke.gin"], [], str(run))
  train = gin_setup.register()["train"]
  # From the 13th update on, an infinite learning rate turns the prompt into Inf/NaN.
  rate = lambda count: jnp.where(count < 12, 0.3, jnp.inf)
  with pytest.raises(NumericalError, match=r"^step 13: the trained .* hold NaN or Inf"):
    train(optimizer=optim.adafactor(learning_rate=rate))
  assert _steps(run) == [10]
  assert not (run / "prompt.npy").exists()
  kept = best_prompt(run)  # the last good checkpoint still restores, and is finite
  assert kept.shape == (4, 32) and np.all(np.isfinite(kept))
  assert json.loads((run / "checkpoints" / "10" / INTEGRITY_FILE).read_text())
  assert os.path.isdir(run / "checkpoints" / "10" / "state")
