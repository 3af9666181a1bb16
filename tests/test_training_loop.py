"""The training loop on its own: when it logs, evaluates and checkpoints, how it checks every
step for NaN, and what it refuses before it starts. (Resuming exactly after kills, damaged
checkpoints and full disks is in test_reliability.py and test_disk_faults.py.)"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import train_step as ts
from softprompt_jax import training_loop
from softprompt_jax.errors import ConfigError, NumericalError
from softprompt_jax.run_log import read_metrics

SMOKE = ["--gin_file", "runs/smoke.gin"]


def _step(loss: float, finite: bool = True) -> dict:
  return {"loss": jnp.float32(loss), ts.FINITE_TRAINABLE: jnp.bool_(finite)}


def test_check_finite_names_the_first_bad_step_and_clears_what_it_checked():
  recent = [(4, _step(1.0)), (5, _step(float("nan"))), (6, _step(float("inf")))]
  with pytest.raises(NumericalError, match=r"^step 5: the loss is nan"):
    ts.check_finite(recent)
  recent = [(7, _step(1.0)), (8, _step(2.0, finite=False))]
  with pytest.raises(NumericalError, match=r"^step 8: the trained parameters .* hold NaN or Inf"):
    ts.check_finite(recent)
  recent = [(9, _step(1.0)), (10, _step(0.5))]
  ts.check_finite(recent)
  assert recent == []  # checked steps are not checked again


def test_values_only_wrong_together_are_refused(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    training_loop._check_train_values(a_file, 4, [".*prompt.*"])
  with pytest.raises(ConfigError, match="prompt_length = 0 leaves nothing to train"):
    training_loop._check_train_values(tmp_path / "new", 0, ".*prompt.*")
  training_loop._check_train_values(tmp_path / "new", 0, [".*"])  # model tuning: fine


def test_logs_evaluations_and_checkpoints_follow_their_intervals(tmp_path):
  """7 steps, log every 2, evaluate every 3: train metrics at the log steps, the eval steps and
  the last; evaluations and checkpoints at 3, 6 and the last step; the best kept beside the
  latest; the summary and the exported prompt are the best step's."""
  from softprompt_jax.cli import main
  run = tmp_path / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.train.num_steps=7",
               "--gin.train.log_every=2", "--gin.train.eval_every=3",
               "--gin.train.keep_checkpoints=1"]) == 0
  assert [r["step"] for r in read_metrics(run, "train")] == [2, 3, 4, 6, 7]
  evals = read_metrics(run, "validation")
  assert [r["step"] for r in evals] == [3, 6, 7]
  summary = json.loads((run / "summary.json").read_text())
  best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))  # the first of the best
  assert summary["steps"] == 7 and summary["best_step"] == best["step"]
  assert summary["best_value"] == best["accuracy"]
  assert summary["final_eval"]["accuracy"] == evals[-1]["accuracy"]
  assert summary["final_loss"] == read_metrics(run, "train")[-1]["loss"]
  kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({7, best["step"]})  # keep_checkpoints=1 latest, plus the best
  prompt = np.load(run / "prompt.npy")
  assert prompt.shape == (4, 32) and np.all(np.isfinite(prompt))
