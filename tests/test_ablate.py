"""scripts/ablate.py (the paper's prompt length x initialisation ablation on the shipped tiny
T5) trains its grid as one sweep, each cell a member with its own run directory, and continues
where it stopped."""

import importlib.util
import json
import pathlib

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "ablate.py"
TINY = ["--lengths", "4", "--seeds", "0", "--steps", "1", "--eval_examples", "8"]
CELLS = ("class_labels", "random_uniform", "sampled_vocab")


def _ablate():
  spec = importlib.util.spec_from_file_location("ablate_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_grid_is_one_sweep_and_a_finished_ablation_trains_nothing(tmp_path, monkeypatch):
  ablate = _ablate()
  out = tmp_path / "ablation"
  final = ablate.main([*TINY, "--out", str(out)])
  assert sorted(final["mean_accuracy"]) == [f"{init}/4" for init in CELLS]
  members = out / "sweep" / "members"
  assert sorted(p.name for p in members.iterdir()) == [f"p4_{init}_s0" for init in CELLS]
  for run in members.iterdir():
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert np.load(run / "prompt.npy").shape[0] == 4
  listed = json.loads((out / "sweep" / "sweep.json").read_text())["members"]
  assert sorted(listed) == sorted(p.name for p in members.iterdir())
  assert "| class label |" in (out / "table.md").read_text()

  def no_training(**kwargs):
    raise AssertionError("a finished ablation trained again")
  monkeypatch.setattr("softprompt_jax.training_loop.train", no_training)
  assert ablate.main([*TINY, "--out", str(out)])["mean_accuracy"] == final["mean_accuracy"]
