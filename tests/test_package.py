"""The package as a user meets it: its version, the command's help, the licence files and the
metadata pyproject.toml declares."""

import argparse
import importlib.metadata
import pathlib
import re
import tomllib

import pytest

import softprompt_jax
from softprompt_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT_TOML = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYPROJECT = PYPROJECT_TOML["project"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
  """The subcommands' parsers, read from the parser itself, so a new command is checked too."""
  parser = cli.build_parser()
  return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_commands_are_found():
  # Guards the helper: an empty list would let the per-command tests pass vacuously.
  expected = {"train", "eval", "infer", "interpret", "export", "demo", "generate"}
  assert expected <= set(_subparsers())


def test_version_is_pyprojects():
  assert softprompt_jax._SOURCE_VERSION == PYPROJECT["version"]
  assert softprompt_jax.__version__ == PYPROJECT["version"]
  # Installed metadata says the same (a stale install after a version bump fails here).
  assert importlib.metadata.version("softprompt_jax") == PYPROJECT["version"]


def test_version_flag_prints_the_version(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(["--version"])
  assert stop.value.code == 0
  assert capsys.readouterr().out.strip() == f"softprompt-jax {PYPROJECT['version']}"


@pytest.mark.parametrize("command", list(_subparsers()))
def test_every_command_has_help_with_an_example(command, capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main([command, "--help"])
  assert stop.value.code == 0
  text = capsys.readouterr().out
  assert _subparsers()[command].description, f"{command} has no description"
  examples = [line.strip() for line in text.splitlines()
              if line.strip().startswith(f"softprompt-jax {command}")]
  assert examples, f"`{command} --help` shows no example:\n{text}"


@pytest.mark.parametrize("command,flag,default", [("demo", "--steps", "300"),
                                                   ("generate", "--method", "greedy"),
                                                   ("train", "--peer_timeout_s", "60")])
def test_help_shows_defaults(command, flag, default, capsys):
  with pytest.raises(SystemExit):
    cli.main([command, "--help"])
  text = " ".join(capsys.readouterr().out.split())  # unwrapped
  options = text[text.index(" options: "):]  # past the usage line, which names every flag
  # The flag, its metavar, then its help up to the next flag must end with the default.
  pattern = rf"{flag} \S+ (?:(?!--).)*?\(default: {re.escape(default)}\)"
  assert re.search(pattern, options), options


def test_help_hides_empty_defaults(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  text = capsys.readouterr().out
  assert "(default: None)" not in text and "(default: [])" not in text
  assert "(default: False)" not in text


def test_every_subpackage_is_in_the_wheel():
  """setuptools ships only the packages pyproject.toml lists; an editable install (the tests')
  finds the others anyway, so only a wheel install would miss them."""
  folders = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "softprompt_jax").rglob("__init__.py")}
  listed = set(PYPROJECT_TOML["tool"]["setuptools"]["packages"]) - {"softprompt_jax.configs"}
  assert folders == listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages"


def test_licence_and_notices():
  licence = (ROOT / "LICENSE").read_text()
  assert "Apache License" in licence and "Version 2.0, January 2004" in licence
  assert "END OF TERMS AND CONDITIONS" in licence
  assert "tests/testdata" in (ROOT / "NOTICE").read_text()
  vendored = (ROOT / "tests" / "testdata" / "NOTICE").read_text()
  assert "google-research/prompt-tuning" in vendored and "Apache" in vendored
  for entry in ("t5x_t5_1_1_tiny/checkpoint_3", "t5x_t5_1_1_tiny/token_embedder_embedding.npy",
                "t5_vocab/sentencepiece.model", "released_prompts/t5_1_1_lm100k_base"):
    assert entry in vendored, f"tests/testdata/NOTICE does not describe {entry}"
    assert (ROOT / "tests" / "testdata" / entry).exists(), entry


def test_metadata():
  assert PYPROJECT["requires-python"] == ">=3.11"
  assert "Programming Language :: Python :: 3.11" in PYPROJECT["classifiers"]
  assert "License :: OSI Approved :: Apache Software License" in PYPROJECT["classifiers"]
  assert any(r.startswith("jax[cuda12]>=") for r in PYPROJECT["optional-dependencies"]["gpu"])


def test_test_data_is_not_package_data():
  # tests/testdata/ is for the tests alone; pip install must not ship it.
  setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert all(p.startswith("softprompt_jax") for p in setuptools["packages"])
  assert all(p.startswith("softprompt_jax") for p in setuptools["package-data"])
