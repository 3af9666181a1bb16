"""Rerunning `train` on a finished run changes nothing; on a run stopped during its final save it
writes the missing results from the checkpoints, without training again."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from conftest import unwrapped_gin
from softprompt_jax.cli import main

SMOKE = ["--gin_file", "runs/smoke.gin"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  run = tmp_path_factory.mktemp("finished") / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


def _snapshot(run) -> dict:
  """Every file of the run: its content's sha256 and its modification time."""
  return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                     p.stat().st_mtime_ns)
          for p in sorted(run.rglob("*")) if p.is_file()}


def _forbid_loading(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the frozen model was loaded for a run that is already complete")
  monkeypatch.setattr("softprompt_jax.run_setup.load_frozen", fail)


def test_a_finished_run_is_recognised_and_every_file_stays(finished, capsys, monkeypatch):
  run = finished  # itself, not a copy: config.gin records the run directory's path
  before = _snapshot(run)
  _forbid_loading(monkeypatch)
  capsys.readouterr()
  for _ in range(2):  # and again: every rerun is the same no-op
    assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
    assert f"{run}: already complete at step 20; nothing to do" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_run_stopped_in_its_final_save_gets_its_results_without_training(finished, tmp_path,
                                                                           monkeypatch):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  expected = json.loads((finished / "summary.json").read_text())
  # What a preemption during the final save leaves: the step-20 checkpoint, but no summary,
  # curves or operative config, and an older prompt.
  for name in ("summary.json", "curves.png", "operative_config.gin"):
    (run / name).unlink()
  np.save(run / "prompt.npy", np.zeros_like(np.load(finished / "prompt.npy")))
  calls = []
  import softprompt_jax.train_step as ts
  step = ts.train_step
  monkeypatch.setattr(ts, "train_step", lambda *a, **k: calls.append(1) or step(*a, **k))
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  assert not calls  # no step was trained again
  summary = json.loads((run / "summary.json").read_text())
  for key in ("steps", "best_step", "best_value", "final_eval", "final_loss"):
    assert summary[key] == expected[key], key
  assert summary["final_loss"] is not None
  np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(finished / "prompt.npy"))
  assert (run / "curves.png").stat().st_size > 0
  assert unwrapped_gin((run / "operative_config.gin").read_text()) == unwrapped_gin(
      (finished / "operative_config.gin").read_text().replace(str(finished), str(run)))
