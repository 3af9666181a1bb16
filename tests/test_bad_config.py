"""Bad configurations through the CLI: one line on stderr, exit status 2, and nothing expensive
(no frozen weights loaded, nothing compiled) before the error."""

import os
import pathlib
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

from softprompt_jax import cli, errors, prompts
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointMismatchError
from softprompt_jax.checkpoints.state import PromptCheckpoints
from softprompt_jax.cli import main
from softprompt_jax.peft_interop import save_peft_adapter
# Imported before any test patches them (a module imported under a patch keeps the patched
# name).
import softprompt_jax.inference  # noqa: F401

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ["--gin_file", "runs/smoke.gin"]
TASK = "taskless_synthetic_sentiment"
D_MODEL = 32  # configs/models/tiny.gin; smoke.gin's prompt is [4, 32]
EVAL = ["--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
        f"--gin.TASK='{TASK}'"]
INFER = ["--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_infer.gin"]


def _fails(capsys, argv, *words):
  """Runs the CLI in-process; asserts status 2, exactly one stderr line of the form
  `softprompt-jax <command>: error: ...` holding `words`; returns that line."""
  capsys.readouterr()
  status = main(argv)
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert status == 2, err
  assert len(lines) == 1, err
  assert lines[0].startswith(f"softprompt-jax {argv[0]}: error: "), lines[0]
  for word in words:
    assert word in lines[0], (word, lines[0])
  return lines[0]


def _npy(path, shape):
  prompts.save_npy(path, np.random.RandomState(0).randn(*shape).astype(np.float32))
  return path


# --------------------------------------------------------------------------------------------
# train: each fault, with the run directory left untouched


TRAIN_FAULTS = {
    "unknown_task": (["--gin.TASK='taskless_synthetic_sentimnet'"],
                     ["unknown task 'taskless_synthetic_sentimnet'", "did you mean",
                      "taskless_synthetic_sentiment"]),
    "vocabulary_larger_than_embedding": (
        ["--gin.frozen_model.overrides={'vocab_size': 200, 'emb_dim': 32, 'mlp_dim': 64, "
         "'num_heads': 4, 'head_dim': 8}"],
        ["vocabulary has 259 ids", "embedding has 200 rows", "use the vocabulary"]),
    "unknown_vocabulary": (["--gin.VOCABULARY='bytes'"], ["unknown vocabulary 'bytes'", "'byte'"]),
    "unknown_override": (["--gin.frozen_model.overrides={'vocab_sise': 384}"],
                         ["'vocab_sise'", "did you mean 'vocab_size'"]),
    "unknown_frozen_dtype": (["--gin.frozen_model.frozen_dtype='int8'"],
                             ["frozen_model.frozen_dtype='int8'", "'bfloat16'"]),
    "misspelled_binding": (["--gin.train.num_stepz=3"],
                           ["gin configuration", "'num_stepz'", "train.num_stepz=3"]),
    "unset_macro": (["--gin.train.task=%NO_SUCH_MACRO"], ["%NO_SUCH_MACRO", "--gin.NO_SUCH_MACRO"]),
    "gin_syntax_error": (["--gin.train.num_steps=)"],
                         ["gin configuration", "Unable to parse value", "train.num_steps=)"]),
    "gin_unclosed_bracket": (["--gin.train.num_steps=("], ["gin configuration", "unclosed"]),
    "prompt_file_not_set": (["--gin_file", "prompts/from_file.gin"],
                            ["no prompt file given", "PROMPT_FILE"]),
    "class_labels_longer_than_prompt": (["--gin.train.prompt_length=1"],
                                        ["2 labels", "length 1", "prompt_length >= 2"]),
}


@pytest.mark.parametrize("fault", sorted(TRAIN_FAULTS))
def test_train_fault_is_one_line_before_any_work(fault, tmp_path, capsys, no_expensive_work):
  extra, words = TRAIN_FAULTS[fault]
  run = tmp_path / "run"
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(run), *extra], *words)
  assert not run.exists()  # no config.gin, no checkpoints: the run never started


def test_missing_gin_file(tmp_path, capsys):
  _fails(capsys, ["train", "--gin_file", "runs/smoke_typo.gin", "--model_dir", str(tmp_path)],
         "gin file 'runs/smoke_typo.gin' not found", "configs")


def test_missing_paths_are_named(tmp_path, capsys, no_expensive_work):
  checkpoint = tmp_path / "no" / "checkpoint_5"
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                  f"--gin.frozen_model.checkpoint='{checkpoint}'"],
         f"no checkpoint at {checkpoint}", "does not exist")
  spm = tmp_path / "missing" / "spm.model"
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                  f"--gin.VOCABULARY='{spm}'"], "SentencePiece model file not found", str(spm))
  npy = tmp_path / "missing.npy"
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                  "--gin_file", "prompts/from_file.gin", f"--gin.PROMPT_FILE='{npy}'"],
         f"prompt file {npy} does not exist")
  assert not (tmp_path / "run").exists()


def test_mesh_that_does_not_divide_the_devices(tmp_path, capsys, no_expensive_work):
  n = jax.device_count()
  run = ["train", *SMOKE, "--model_dir", str(tmp_path / "run")]
  _fails(capsys, [*run, f"--gin.train.num_partitions={n + 1}"],
         f"num_partitions={n + 1} does not divide the {n} devices", "one of [1")
  _fails(capsys, [*run, f"--gin.train.mesh_shape=({n + 1}, 1)"],
         f"mesh_shape ({n + 1}, 1)", f"product must be {n}")
  if n == 1:
    pytest.skip("every batch divides over one device")
  _fails(capsys, [*run, f"--gin.train.batch_size={n + n // 2}"],
         f"batch_size {n + n // 2}", f"data axis ({n} of the {n} devices", f"multiple of {n}")


@pytest.mark.parametrize("shape,words", [
    ((4, 16), ["shape (4, 16)", "model's prompt is (4, 32)", "d_model 32"]),
    ((6, 32), ["shape (6, 32)", "model's prompt is (4, 32)", "set prompt_length to 6"]),
])
def test_prompt_npy_of_another_shape(tmp_path, capsys, no_expensive_work, shape, words):
  npy = _npy(tmp_path / "p.npy", shape)
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"), "--gin_file",
                  "prompts/from_file.gin", f"--gin.PROMPT_FILE='{npy}'"], str(npy), *words)


def test_t5x_and_peft_prompts_of_another_shape(tmp_path, capsys, no_expensive_work):
  values = np.ones((4, 16), np.float32)
  ckpt = tmp_path / "checkpoint_7"
  ckpt.mkdir()
  (ckpt / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"target": {"encoder": {"prompt": {"prompt": values}}}}}))
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                  "--gin.train.prompt_init=@prompts.from_t5x_checkpoint",
                  f"--gin.prompts.from_t5x_checkpoint.path='{ckpt}'"],
         str(ckpt), "(4, 16)", "(4, 32)")
  adapter = save_peft_adapter(tmp_path / "adapter", values, num_layers=2, num_heads=4)
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                  "--gin.train.prompt_init=@prompts.from_peft_adapter",
                  f"--gin.prompts.from_peft_adapter.path='{adapter}'"],
         str(adapter), "(4, 16)", "(4, 32)")


def test_resume_with_another_prompt_length(tmp_path, capsys, no_expensive_work):
  """The saved settings are compared before loading, and the run's config.gin is kept."""
  run = tmp_path / "run"
  saved = PromptCheckpoints(run / "checkpoints")
  meta = {"task": TASK, "prompt_length": 4, "trainable": [".*prompt.*"], "model_fingerprint": None}
  saved.save(10, {"step": np.int32(10)}, {"position": 0}, meta)
  saved.close()
  (run / "config.gin").write_text("# the original run's configuration\n")
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(run), "--gin.train.prompt_length=8"],
         str(run), "prompt_length=4, now 8", "new --model_dir")
  assert (run / "config.gin").read_text() == "# the original run's configuration\n"


# --------------------------------------------------------------------------------------------
# eval and infer


def test_eval_faults(tmp_path, capsys, no_expensive_work):
  npy = _npy(tmp_path / "narrow.npy", (4, 16))
  _fails(capsys, ["eval", *EVAL, f"--gin.PROMPT_FILE='{npy}'"], str(npy), "(4, 16)", "(4, 32)")
  adapter = save_peft_adapter(tmp_path / "adapter", np.ones((5, 16), np.float32), num_layers=2,
                              num_heads=4)
  _fails(capsys, ["eval", *EVAL, f"--gin.PROMPT_FILE='{adapter}'"], str(adapter), "(5, 16)",
         "(5, 32)")
  missing = tmp_path / "missing.npy"
  _fails(capsys, ["eval", *EVAL, f"--gin.PROMPT_FILE='{missing}'"], str(missing),
         "does not exist")
  _fails(capsys, ["eval", *EVAL, "--gin.TASK='no_such_task'",
                  f"--gin.PROMPT_FILE='{_npy(tmp_path / 'ok.npy', (4, D_MODEL))}'"],
         "unknown task 'no_such_task'")
  _fails(capsys, ["eval", *EVAL, "--model_dir", str(tmp_path / "no_run")],
         str(tmp_path / "no_run"), "does not exist")
  assert not (tmp_path / "no_run").exists()


def test_infer_faults(tmp_path, capsys, no_expensive_work):
  good = _npy(tmp_path / "good.npy", (4, D_MODEL))
  narrow = _npy(tmp_path / "narrow.npy", (4, 16))
  longer = _npy(tmp_path / "longer.npy", (6, D_MODEL))
  files = [f"--gin.INPUT_FILE='{tmp_path / 'requests.jsonl'}'",
           f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'"]
  bank = {TASK: str(good), "taskless_synthetic_copy": str(narrow)}
  _fails(capsys, ["infer", *INFER, f"--gin.PROMPTS={bank!r}", *files],
         "PROMPTS['taskless_synthetic_copy']", str(narrow), "(4, 16)", "(4, 32)")
  bank = {TASK: str(good), "taskless_synthetic_copy": str(longer)}
  _fails(capsys, ["infer", *INFER, f"--gin.PROMPTS={bank!r}", *files],
         "one shape", "(6, 32)", "(4, 32)")
  # A good bank, but no request file: read before the model is loaded.
  bank = {TASK: str(good)}
  _fails(capsys, ["infer", *INFER, f"--gin.PROMPTS={bank!r}", *files], "requests.jsonl")
  assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Tracebacks: on request, and always for bugs


def test_traceback_on_request(tmp_path, capsys, monkeypatch, no_expensive_work):
  from softprompt_jax.data.tasks import UnknownTaskError
  argv = ["train", *SMOKE, "--model_dir", str(tmp_path / "run"), "--gin.TASK='nope'"]
  with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
    main([*argv, "--traceback"])
  with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
    main(["--traceback", *argv])
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
    main(argv)
  monkeypatch.setenv(cli.TRACEBACK_ENV, "0")
  _fails(capsys, argv, "unknown task 'nope'")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
  def broken(**kwargs):
    raise RuntimeError("a bug, not a configuration error")
  monkeypatch.setattr("softprompt_jax.training_loop.setup_run", broken)
  with pytest.raises(RuntimeError, match="a bug"):
    main(["train", *SMOKE, "--model_dir", str(tmp_path / "run")])
  # A ValueError that is no project error type is a bug too.
  monkeypatch.setattr("softprompt_jax.training_loop.setup_run",
                      lambda **kwargs: np.stack([np.ones(2), np.ones(3)]))
  with pytest.raises(ValueError, match="same shape"):
    main(["train", *SMOKE, "--model_dir", str(tmp_path / "run")])


def test_multi_line_messages_become_one_line():
  error = CheckpointMismatchError("checkpoint x does not fit the model (2 missing):\n  missing a"
                                  "\n  missing b")
  assert errors.one_line(error) == "checkpoint x does not fit the model (2 missing): missing a; " \
      "missing b"
  many = CheckpointMismatchError("head:\n" + "\n".join(f"  line {i}" for i in range(30)))
  text = errors.one_line(many)
  assert "\n" not in text and "line 10" in text and "line 11" not in text
  assert "19 more (--traceback shows all)" in text  # 31 lines, 12 shown


def test_subprocess_prints_one_line_and_exits_2(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop(cli.TRACEBACK_ENV, None)
  run = tmp_path / "run"
  done = subprocess.run([sys.executable, "-m", "softprompt_jax", "train", *SMOKE, "--model_dir",
                         str(run), "--gin.TASK='no_such_task'"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("softprompt-jax train: error: unknown task 'no_such_task'")
  assert not run.exists()
