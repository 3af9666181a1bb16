"""configs/runs/smoke.gin end to end through the CLI: train -> eval -> infer -> export, resume."""

import json

import numpy as np
import pytest

from softprompt_jax.cli import main

SMOKE = ["--gin_file", "runs/smoke.gin"]
TASK = "taskless_synthetic_sentiment"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("smoke_run")
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


def test_train_writes_checkpoints_logs_prompt_and_summary(trained):
  steps = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [10, 20]  # checkpointed twice
  summary = json.loads((trained / "summary.json").read_text())
  assert summary["steps"] == 20 and summary["best_step"] in (10, 20)
  assert 0 <= summary["best_value"] <= 100
  prompt = np.load(trained / "prompt.npy")
  assert prompt.shape == (4, 32) and prompt.dtype == np.float32
  records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  assert any(record.get("split") == "validation" for record in records)
  assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "train.num_steps = 20" in (trained / "operative_config.gin").read_text()
  assert list((trained / "tensorboard").rglob("events.out.tfevents*"))


def test_eval_infer_export_interpret(trained, tmp_path, capsys):
  assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
               f"--gin.TASK='{TASK}'", "--gin.evaluate.input_length=64",
               "--gin.evaluate.target_length=10", "--gin.evaluate.max_examples=16",
               "--model_dir", str(trained)]) == 0
  evaluated = json.loads((trained / "eval_validation.json").read_text())
  summary = json.loads((trained / "summary.json").read_text())
  if summary["best_step"] == 20:  # the exported prompt is the one evaluated at the last step
    assert evaluated["metrics"]["accuracy"] == summary["final_eval"]["accuracy"]

  out = tmp_path / "exported.npy"
  assert main(["export", "--model_dir", str(trained), "--out", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out), np.load(trained / "prompt.npy"))

  requests = tmp_path / "requests.jsonl"
  requests.write_text("\n".join(json.dumps(r) for r in [
      {"task": TASK, "inputs": "great happy day"},
      {"task": "taskless_synthetic_copy", "inputs": "apple dog"},
      {"task": TASK, "record": {"text": "awful sad", "label": 0}}]) + "\n")
  predictions = tmp_path / "predictions.jsonl"
  bank = {TASK: str(trained), "taskless_synthetic_copy": str(out)}
  assert main(["infer", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_infer.gin",
               f"--gin.PROMPTS={bank!r}", f"--gin.INPUT_FILE='{requests}'",
               f"--gin.OUTPUT_FILE='{predictions}'", "--gin.infer.input_length=64",
               "--gin.infer.target_length=10"]) == 0
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [r["task"] for r in rows] == [TASK, "taskless_synthetic_copy", TASK]
  assert rows[2]["inputs"] == "awful sad" and all(isinstance(r["prediction"], str) for r in rows)

  assert main(["interpret", "--model_dir", str(trained)]) == 0
  reading = json.loads((trained / "interpretation.json").read_text())["nearest_tokens"]
  assert len(reading) == 4 and len(reading[0]["ids"]) == 5


def test_resume_continues_where_it_stopped(tmp_path, trained):
  run = tmp_path / "resumed"
  # A first invocation stops after 10 steps (as a preemption would) with its checkpoint...
  assert main(["train", *SMOKE, "--model_dir", str(run),
               "--gin.train.stop_after_steps=10"]) == 0
  assert not (run / "summary.json").exists()
  # ... and the same command continues from step 10, ending where an uninterrupted run ends.
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  assert json.loads((run / "summary.json").read_text())["steps"] == 20
  np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(trained / "prompt.npy"))


def test_misspelled_binding_fails_before_any_work(tmp_path, capsys):
  run = tmp_path / "never"
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.train.num_stepz=3"]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "num_stepz" in error[0]
  assert not run.exists()


def test_a_train_start_opens_the_frozen_checkpoint_once_for_metadata_once_for_weights(
    tmp_path, monkeypatch):
  """The configuration is read from metadata before anything is loaded; then one reader gives
  the configuration, the shapes check and every weight."""
  from softprompt_jax.checkpoints import loading
  from softprompt_jax.pretrained import TINY_MODEL_DIR
  events = []
  open_checkpoint, read_params = loading.open_checkpoint, loading.read_params
  monkeypatch.setattr(loading, "open_checkpoint",
                      lambda path: events.append("open") or open_checkpoint(path))
  monkeypatch.setattr(loading, "read_params",
                      lambda *args, **kwargs: events.append("read") or read_params(*args, **kwargs))
  assert main(["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
               f"--gin.frozen_model.checkpoint='{TINY_MODEL_DIR}'",
               "--gin.frozen_model.overrides={}", "--gin.train.num_steps=2",
               "--gin.train.eval_every=2", "--gin.train.eval_max_examples=8"]) == 0
  assert events == ["open", "open", "read"]
