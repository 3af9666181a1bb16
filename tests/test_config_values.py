"""Every gin-bound value is checked for type and range before anything is loaded: a bad one is
one line (exit 2) naming the parameter and what it accepts; Ctrl-C or SIGTERM before the first
step is one line too, with the run directory left as it was."""

import inspect
import json
import os
import signal
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from softprompt_jax import gin_setup
from softprompt_jax.cli import main

SMOKE = ["--gin_file", "runs/smoke.gin"]


def _one_line_error(capsys, argv) -> str:
  capsys.readouterr()
  status = main(argv)
  err = capsys.readouterr().err.splitlines()
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith(f"softprompt-jax {argv[0]}: error: "), err
  return err[0]


def test_every_configurable_parameter_has_a_rule():
  for name, (fn, rules) in gin_setup.parameter_rules().items():
    assert set(inspect.signature(fn).parameters) == set(rules), name


# The faults a careless user made, each: the binding, then words the one line must hold.
BAD_VALUES = {
    "batch_size_zero": ("train.batch_size=0", ["train.batch_size=0", "integer >= 1"]),
    "batch_size_negative": ("train.batch_size=-8", ["train.batch_size=-8", ">= 1"]),
    "prompt_length_zero": ("train.prompt_length=0",
                           ["train.prompt_length = 0", "nothing to train"]),
    "prompt_length_huge": ("train.prompt_length=100000",
                           ["GiB per device", "prompt_length 100000", "shorter prompt"]),
    "learning_rate_string": ("optim.adafactor.learning_rate='0.3'",
                             ["optim.adafactor.learning_rate='0.3'", "without quotes"]),
    "keep_checkpoints_negative": ("train.keep_checkpoints=-1",
                                  ["train.keep_checkpoints=-1", ">= 1"]),
    "keep_checkpoints_zero": ("train.keep_checkpoints=0", ["train.keep_checkpoints=0"]),
    "seed_negative": ("train.seed=-1", ["train.seed=-1", ">= 0"]),
    "num_steps_float": ("train.num_steps=2.5", ["train.num_steps=2.5", "integer"]),
    "dropout_one": ("train.dropout_rate=1.0", ["train.dropout_rate=1.0", "< 1"]),
    "unknown_size": ("frozen_model.size='huge'", ["frozen_model.size='huge'", "'base'"]),
    "bool_for_number": ("train.z_loss=True", ["train.z_loss=True", "not a number"]),
    "decay_rate_zero": ("optim.adafactor.decay_rate=0", ["optim.adafactor.decay_rate=0", "> 0"]),
    "initializer_tokens": ("prompts.class_labels.num_tokens=0",
                           ["prompts.class_labels.num_tokens=0"]),
    "data_source_number": ("train.data_source=5", ["train.data_source=5", "a path"]),
}


@pytest.mark.parametrize("binding, words", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_bad_value_is_one_line_naming_it_before_anything_is_loaded(
    binding, words, tmp_path, capsys, no_expensive_work):
  run = tmp_path / "run"
  line = _one_line_error(capsys, ["train", *SMOKE, "--model_dir", str(run), f"--gin.{binding}"])
  for word in words:
    assert word in line, (word, line)
  assert not run.exists()  # left as it was found


def test_a_model_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys, no_expensive_work):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  line = _one_line_error(capsys, ["train", *SMOKE, "--model_dir", str(a_file)])
  assert "is a file" in line and str(a_file) in line
  assert a_file.read_text() == "mine"


# --------------------------------------------------------------------------------------------
# Drawn bindings: wrong types, zero, negative, huge, over every configurable's parameters


# Python literals as gin reads them, of every kind a binding can hold.
LITERALS = st.one_of(
    st.integers(-2**40, 2**40).map(repr), st.sampled_from(["0", "-1", "10**30", "2**64"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["1e999", "-1e999", "0.0", "-0.0", "1e-300"]),
    st.text(alphabet="ab1.-_ ", max_size=6).map(repr), st.sampled_from(["True", "False", "None"]),
    st.sampled_from(["[]", "[1]", "['a']", "[0, 8]", "()", "{}", "{'a': 1}", "{'a': 'b'}"]),
)
# Parameters a binding may not take over in this test: where the run goes (the CLI's
# --model_dir sets it) and the gin references the run is built from.
NOT_DRAWN = {"train.model_dir", "interpret.model_dir"}


def _parameters() -> list[str]:
  names = []
  for name, (fn, _) in gin_setup.parameter_rules().items():
    names += [f"{name}.{p}" for p in inspect.signature(fn).parameters]
  return sorted(set(names) - NOT_DRAWN)


class _Loading(Exception):
  """Raised where the frozen model would be loaded: every check has passed by then."""


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(parameter=st.sampled_from(_parameters()), value=LITERALS)
def test_drawn_bindings_either_pass_the_checks_or_are_one_line_before_loading(
    parameter, value, tmp_path_factory, capsys, monkeypatch):
  for target in ("softprompt_jax.run_setup.load_frozen", "softprompt_jax.run_setup.model_config"):
    monkeypatch.setattr(target, _raise_loading)
  run = tmp_path_factory.mktemp("drawn") / "run"
  capsys.readouterr()
  try:
    status = main(["train", *SMOKE, "--model_dir", str(run), f"--gin.{parameter}={value}"])
  except _Loading:
    return  # accepted: the values that pass are run for real below, at the edges of each range
  err = capsys.readouterr().err.splitlines()
  assert status == 2 and len(err) == 1, (parameter, value, err)
  assert err[0].startswith("softprompt-jax train: error: "), err
  assert not run.exists() or not any(run.iterdir()), sorted(run.iterdir())


def _raise_loading(*args, **kwargs):
  raise _Loading()


def test_values_at_the_edges_of_every_train_range_run(tmp_path, capsys):
  """The smallest and largest values the checks let through work end to end (one run)."""
  run = tmp_path / "run"
  edges = ["train.num_steps=1", "train.eval_every=1", "train.log_every=1",
           "train.keep_checkpoints=1", "train.prompt_length=1", "train.input_length=1",
           "train.target_length=1", "train.eval_max_examples=1", "train.seed=4294967295",
           "train.dropout_rate=0.999", "train.label_smoothing=0.999", "train.z_loss=0",
           "train.loss_normalizer=1e-30", "train.stop_after_steps=1",
           "optim.adafactor.decay_rate=1", "optim.adafactor.weight_decay_rate=None",
           "optim.adafactor.momentum=0.0", "optim.adafactor.clipping_threshold=1e-30",
           "prompts.class_labels.num_tokens=1", "train.prompt_init=@prompts.random_uniform",
           "prompts.random_uniform.scale=1e-30"]
  assert main(["train", *SMOKE, "--model_dir", str(run), *[f"--gin.{e}" for e in edges]]) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 1 and summary["final_eval"]["num_examples"] == 1


# --------------------------------------------------------------------------------------------
# Resuming with another seed or other data


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_resuming_with_another_seed_or_other_data_is_refused(tmp_path, capsys, monkeypatch):
  from softprompt_jax.data.synthetic import make_records
  train_file = tmp_path / "train.jsonl"
  _write_jsonl(train_file, make_records("sentiment", "train", 64))
  data = {"train": str(train_file), "validation": _write_jsonl(
      tmp_path / "validation.jsonl", make_records("sentiment", "validation", 16))}
  run = tmp_path / "run"
  command = ["train", *SMOKE, "--model_dir", str(run), f"--gin.DATA={data!r}"]
  assert main([*command, "--gin.train.stop_after_steps=10"]) == 0
  assert (run / "checkpoints" / "10").is_dir()
  saved = sorted(p.name for p in run.rglob("*"))

  with monkeypatch.context() as patch:  # refused from the saved settings, before loading
    patch.setattr("softprompt_jax.run_setup.load_frozen", _raise_loading)
    line = _one_line_error(capsys, [*command, "--gin.train.seed=1"])
    assert "trained with seed=0, now 1" in line, line
    other = {**data, "train": _write_jsonl(tmp_path / "other.jsonl",
                                           make_records("sentiment", "train", 64, seed=5))}
    line = _one_line_error(capsys, ["train", *SMOKE, "--model_dir", str(run),
                                    f"--gin.DATA={other!r}"])
    assert "trained with data_source=" in line and "other.jsonl" in line, line

  # The same file, edited: the saved position would point at other examples.
  original = train_file.read_text()
  _write_jsonl(train_file, make_records("sentiment", "train", 80))
  line = _one_line_error(capsys, command)
  assert "training data changed" in line and "80" in line, line
  train_file.write_text(original)
  assert sorted(p.name for p in run.rglob("*")) == saved  # nothing was written meanwhile
  assert main(command) == 0  # and the run resumes once the data is back


# --------------------------------------------------------------------------------------------
# Ctrl-C or SIGTERM before the first step


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_the_first_step_is_one_line_and_leaves_the_directory(
    signal_number, tmp_path, capsys, monkeypatch):
  def signalled_while_loading(*args, **kwargs):
    os.kill(os.getpid(), signal_number)
    time.sleep(5)  # the handler raises in this thread at once
    raise AssertionError("the signal did not interrupt the run")
  monkeypatch.setattr("softprompt_jax.run_setup.load_frozen", signalled_while_loading)
  run = tmp_path / "run"
  capsys.readouterr()
  before = signal.getsignal(signal_number)
  status = main(["train", *SMOKE, "--model_dir", str(run)])
  err = capsys.readouterr().err.splitlines()
  assert status == 128 + signal_number, err
  assert len(err) == 1 and err[0].startswith("softprompt-jax train: interrupted ("), err
  assert signal.Signals(signal_number).name in err[0]
  assert not run.exists()  # a fresh directory is removed again: nothing was trained
  assert signal.getsignal(signal_number) is before  # handlers restored
