"""Wayward prompts (methods/wayward.py): the regularizer against a numpy oracle of the official
objective, the refusals, and configs/runs/smoke_wayward.gin end to end through the CLI (train
logs the distance, eval, interpret's two accuracies, export)."""

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import gin_setup, inference, prompt_reports
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError
from softprompt_jax.methods import PromptTuning, from_description
from softprompt_jax.methods.wayward import DISTANCE_METRIC, WaywardPrompt, wayward
from softprompt_jax.model_spec import ModelSpec, load_frozen
from softprompt_jax.peft_interop import load_peft_adapter
from softprompt_jax.run_dir import required_meta
from softprompt_jax.tokenizers import get_vocabulary

SMOKE = ["--gin_file", "runs/smoke_wayward.gin"]
TASK = "taskless_synthetic_sentiment"
TEXT = "positive or negative"  # smoke_wayward.gin's
# The run's settings, as `eval` is told them (interpret reads them from the run's config).
EVAL = ["--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
        f"--gin.TASK='{TASK}'", "--gin.evaluate.input_length=64",
        "--gin.evaluate.target_length=10", "--gin.evaluate.max_examples=16", "--gin.BATCH_SIZE=8"]


def _oracle_distance(prompt_PxH, table_VxH, text):
  """The official squared_l2_distance against the embedded text, zeros after it, in numpy; the
  byte vocabulary's ids are the UTF-8 bytes + 3 (pad, eos, unk first)."""
  ids = [b + 3 for b in text.encode("utf-8")]
  target = np.zeros_like(prompt_PxH)
  target[:len(ids)] = table_VxH[ids]
  return np.sum((prompt_PxH - target) ** 2) / prompt_PxH.shape[0]


def test_the_regularizer_is_gamma_times_the_official_distance_and_its_gradient():
  rng = np.random.default_rng(0)
  table_VxH = rng.normal(size=(384, 8)).astype(np.float32)
  prompt_PxH = rng.normal(size=(6, 8)).astype(np.float32)
  method = wayward(text="abc", gamma=0.5, vocabulary="byte")
  trainable = {"prompt": {"prompt": jnp.asarray(prompt_PxH)}}
  frozen = {"token_embedder": {"embedding": jnp.asarray(table_VxH)}}
  term, metrics = method.regularizer(trainable, frozen)
  expected = _oracle_distance(prompt_PxH, table_VxH, "abc")
  np.testing.assert_allclose(float(metrics[DISTANCE_METRIC]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(term), 0.5 * expected, rtol=1e-5)
  # d/dp gamma * |p - t|^2 / P = 2 gamma (p - t) / P; the target (the frozen table) is constant.
  grads = jax.grad(lambda t, f: method.regularizer(t, f)[0], argnums=(0, 1))(trainable, frozen)
  target = np.zeros_like(prompt_PxH)
  target[:3] = table_VxH[[b + 3 for b in b"abc"]]
  np.testing.assert_allclose(grads[0]["prompt"]["prompt"], 2 * 0.5 * (prompt_PxH - target) / 6,
                             rtol=1e-5, atol=1e-7)
  assert not np.any(grads[1]["token_embedder"]["embedding"])
  np.testing.assert_allclose(method.target(table_VxH, 6), target)


def test_the_text_is_tokenized_by_the_runs_vocabulary(testdata):
  spm = str(testdata / "t5_vocab" / "sentencepiece.model")
  method = wayward(text="Classify this review .", vocabulary=spm)
  assert method.token_ids == tuple(get_vocabulary(spm).encode("Classify this review ."))
  assert len(method.token_ids) < len("Classify this review .")  # pieces, not bytes


def test_the_official_text_of_wayward_gin_fills_its_prompt_with_t5s_vocabulary(testdata):
  """runs/wayward.gin's prompt length is its text's token count (as the official config's)."""
  gin_setup.parse(["models/t5_1_1.gin", "runs/wayward.gin"],
                  [f"VOCABULARY = '{testdata / 't5_vocab' / 'sentencepiece.model'}'",
                   "TASK = 'glue_sst2'"], None)
  method = gin_setup.register()["methods.wayward"]()  # with the file's bindings
  assert isinstance(method, WaywardPrompt) and method.gamma == 0.01
  assert len(method.token_ids) == gin.query_parameter("train.prompt_length") == 100
  gin.clear_config()


def test_refusals_are_one_line_before_loading(tmp_path, capsys, no_expensive_work):
  run = tmp_path / "run"
  # (with another prompt init: from_text, the config's, refuses a short prompt on its own)
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.train.prompt_length=19",
               "--gin.train.prompt_init=@prompts.random_uniform"]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "methods.wayward: the text has 20 tokens" in error[0]
  assert "prompt_length = 20" in error[0]
  assert not run.exists()
  assert main(["train", *SMOKE, "--model_dir", str(run),
               "--gin.methods.wayward.vocabulary=None"]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "methods.wayward.vocabulary" in error[0]
  with pytest.raises(ConfigError, match="encodes to no tokens"):
    _ = WaywardPrompt(text="", vocabulary="byte").token_ids
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.methods.wayward.gamma=-1"]) == 2
  assert "gamma" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("wayward_run")
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


def test_train_logs_the_distance_inside_the_loss(trained):
  records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if r.get("split") == "train"]
  assert logged and all(DISTANCE_METRIC in r for r in logged)
  for r in logged:  # loss = cross-entropy + z-loss + gamma * distance
    np.testing.assert_allclose(r["loss"], r["cross_entropy"] + r["z_loss"]
                               + 0.01 * r[DISTANCE_METRIC], rtol=1e-5)
  # The prompt starts at the text (from_text) and moves away from it as it learns the task.
  assert 0 < logged[0][DISTANCE_METRIC]
  method = inference.run_method(trained)
  assert method == WaywardPrompt(text=TEXT, gamma=0.01, vocabulary="byte")
  assert from_description(required_meta(trained)["method"]) == method


def _frozen_table(run) -> np.ndarray:
  spec = dict(required_meta(run)["model"])
  spec["overrides"] = tuple(sorted(spec["overrides"].items()))
  return np.asarray(load_frozen(ModelSpec(**spec))[1]["token_embedder"]["embedding"])


def test_eval_interpret_and_export(trained, tmp_path, capsys, monkeypatch):
  assert main(["eval", *EVAL, "--model_dir", str(trained)]) == 0
  evaluated = json.loads((trained / "eval_validation.json").read_text())["metrics"]
  capsys.readouterr()

  assert main(["interpret", "--model_dir", str(trained), f"--gin.interpret.task='{TASK}'",
               "--gin.interpret.max_examples=16"]) == 0
  printed = json.loads(capsys.readouterr().out.splitlines()[0])
  reading = json.loads((trained / "interpretation.json").read_text())
  assert printed["continuous"] == reading["continuous"] and printed["projected"] == reading[
      "projected"]
  # The prompt as trained is what `eval` measures, on the same examples.
  assert reading["continuous"] == evaluated
  assert reading["task"] == TASK and reading["projected"]["num_examples"] == 16

  # The nearest tokens are the brute-force nearest by cosine, and the projection evaluated is
  # their embeddings: a prompt file of those rows, evaluated by `eval`, scores the same.
  prompt = np.load(trained / "prompt.npy")
  table = _frozen_table(trained)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  nearest = np.argmax(unit(prompt) @ unit(table).T, axis=-1)
  rows = reading["nearest_tokens"]
  assert [row["ids"][0] for row in rows] == nearest.tolist() and len(rows) == 20
  projected = tmp_path / "projected.npy"
  np.save(projected, table[nearest])
  assert main(["eval", *EVAL, f"--gin.PROMPT_FILE='{projected}'"]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1]) == reading["projected"]

  out = tmp_path / "exported.npy"
  assert main(["export", "--model_dir", str(trained), "--out", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out), prompt)
  adapter = tmp_path / "adapter"
  assert main(["export", "--model_dir", str(trained), "--out", str(adapter)]) == 0
  np.testing.assert_array_equal(load_peft_adapter(adapter), prompt)

  # A prompt-tuning run is read through its prompt file alone (not the trained subtree): the
  # same prompt, so the same reading.
  monkeypatch.setattr("softprompt_jax.prompt_reports.run_method", lambda source: PromptTuning())
  as_prompt = prompt_reports.interpret_prompt(model_dir=str(trained), task=TASK, max_examples=16)
  assert as_prompt == reading
