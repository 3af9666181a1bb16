"""The gin names of softprompt_jax's configurables, and config parsing as t5x does it.

The library's functions stay plain; they are registered here, once, under short module-style
names (`train`, `frozen_model`, `optim.adafactor`, `prompts.class_labels`, ...), so gin files read
like t5x's.
"""

from __future__ import annotations

import importlib.resources
import inspect
import logging
import pathlib
import re
import tokenize
from typing import Sequence

import gin

from softprompt_jax import (inference, methods, model_spec, optim, prompt_reports, prompts,
                            t5x_compat, training_loop)
from softprompt_jax.errors import ConfigError
from softprompt_jax.serving import serve

_REGISTERED: dict = {}


def _entries() -> list:
  """(function, gin name, gin module, the rules its parameters are checked by)."""
  entries = [
      (training_loop.train, "train", None, training_loop.TRAIN_RULES),
      (inference.evaluate, "evaluate", None, inference.EVALUATE_RULES),
      (inference.infer, "infer", None, inference.INFER_RULES),
      (serve.serve, "serve", None, serve.SERVE_RULES),
      (prompt_reports.interpret_prompt, "interpret", None, prompt_reports.INTERPRET_RULES),
      (model_spec.frozen_model, "frozen_model", None, model_spec.FROZEN_MODEL_RULES),
      (optim.adafactor, "adafactor", "optim", optim.ADAFACTOR_RULES),
      (optim.adam, "adam", "optim", optim.ADAM_RULES),
  ]
  for name, entry in prompts.INITIALIZERS.items():
    entries.append((entry.factory, name, "prompts", prompts.INITIALIZER_RULES[name]))
  for name, entry in methods.METHODS.items():
    entries.append((entry.factory, name, "methods", entry.rules))
  return entries


def register() -> dict:
  """Registers every configurable (idempotent); returns {name: configurable}."""
  if _REGISTERED:
    return _REGISTERED
  for fn, name, module, _ in _entries():
    key = f"{module}.{name}" if module else name
    _REGISTERED[key] = gin.external_configurable(fn, name=name, module=module)
  t5x_compat.register()
  return _REGISTERED


def parameter_rules() -> dict:
  """{gin name: (function, {parameter: config_checks.Rule})} of every configurable."""
  return {(f"{module}.{name}" if module else name): (fn, rules)
          for fn, name, module, rules in _entries()}


def config_search_paths() -> list[pathlib.Path]:
  """Where `--gin_file` names are looked up: the working directory, then the shipped configs
  (the checkout's configs/ or the installed package's copy)."""
  paths = [pathlib.Path.cwd()]
  checkout = pathlib.Path(__file__).resolve().parent.parent / "configs"
  if checkout.is_dir():
    paths.append(checkout)
  try:
    installed = pathlib.Path(str(importlib.resources.files("softprompt_jax") / "configs"))
    if installed.is_dir():
      paths.append(installed)
  except (ModuleNotFoundError, TypeError):
    pass
  return paths


# Set before any file, so whichever file sets them wins wherever it stands among the --gin_file
# flags (prompt-tuning's documented order puts the prompts file before the runs file).
DEFAULT_BINDINGS = ["train.prompt_init = @prompts.class_labels"]


def parse(gin_files: Sequence[str], bindings: Sequence[str], model_dir: str | None,
          search_paths: Sequence[str] = ()) -> None:
  """Files in order, then bindings (as t5x: later wins); MODEL_DIR from --model_dir.
  `search_paths` (t5x's --gin_search_paths) are looked in first, then ./ and the shipped configs.

  An unknown configurable or parameter, a syntax error or a file not found raises ConfigError
  here, in one line, before any work.
  """
  register()
  gin.clear_config()
  # gin only appends to its search list: start it afresh, so one parse's paths (and their order)
  # never carry into the next.
  gin.config._LOCATION_PREFIXES[:] = [""]
  for path in [*search_paths, *config_search_paths()]:
    gin.add_config_file_search_path(str(path))
  macro = [f"MODEL_DIR = {model_dir!r}"] if model_dir is not None else ["MODEL_DIR = None"]
  # gin logs an error for every search path a file is not in before finding it; a file found
  # nowhere still raises, so those messages are noise.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    gin.parse_config(DEFAULT_BINDINGS)
    gin.parse_config_files_and_bindings(list(gin_files), [], finalize_config=False)
    read_by_files = _macros_read()
    gin.parse_config_files_and_bindings([], macro + list(bindings), finalize_config=False)
  except Exception as e:  # gin raises many types; here each one means a configuration error
    raise ConfigError(f"gin configuration: {describe_error(e)}") from None
  finally:
    root.setLevel(level)
  parameters = {key: set(inspect.signature(fn).parameters)
                for key, (fn, _) in parameter_rules().items()}
  honoured = t5x_compat.translate(parameters)  # t5x names rebound under ours, or refused
  try:
    gin.finalize()
  except Exception as e:
    raise ConfigError(f"gin configuration: {describe_error(e)}") from None
  _check_macros_used(bindings, honoured, read_by_files)


def _macros_read() -> set[str]:
  """The macros some binding refers to."""
  used = set()

  def collect(value) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
      if value.selector == "gin.macro":
        used.add(value.scoped_selector.split("/")[0])
    elif isinstance(value, dict):
      for item in value.values():
        collect(item)
    elif isinstance(value, (list, tuple)):
      for item in value:
        collect(item)
  for parameters in gin.config._CONFIG.values():  # gin keeps no public list of its bindings
    for value in parameters.values():
      collect(value)
  return used


def _check_macros_used(bindings: Sequence[str], honoured: set[str],
                       read_by_files: set[str]) -> None:
  """A macro that no setting reads would be silently ignored (a typo, or a t5x name with no
  meaning here): refuse it, naming it and the macros that are read. One set on the command line
  must be read by the final config; one set in a gin file may also be one the files read before
  a binding replaced its reader (`--gin.train.batch_size=4` leaves BATCH_SIZE unread: fine).
  `honoured`: t5x names rebound under ours. MODEL_DIR comes from --model_dir for every command."""
  on_command_line = {m.group(1) for b in bindings
                     if (m := re.match(r"\s*([A-Za-z_]\w*)\s*=", b))}  # NAME = …: a macro
  defined = {scope for (scope, selector) in gin.config._CONFIG if selector == "gin.macro"}
  used = _macros_read()
  for name in sorted(defined - used - honoured - {"MODEL_DIR"}):
    if name in on_command_line:
      where = f"--gin.{name} is set"
    elif name in read_by_files:
      continue
    else:
      where = f"macro {name} is set in a gin file"
    read = ", ".join(sorted(used - {"MODEL_DIR"})) or "none"
    raise ConfigError(f"{where}, but no setting reads %{name}, so it would be ignored; macros "
                      f"these gin files read: {read} (t5x's names: see the README's table)")


def describe_error(error: BaseException) -> str:
  """A gin parse error in one line: its message plus where (file or binding, line, text)."""
  if isinstance(error, SyntaxError):
    text = (error.text or "").strip()
    if error.filename in (None, "", "bindings"):  # line numbers count our MODEL_DIR macro
      return f"{error.msg} (in the binding {text})"
    return f"{error.msg} ({error.filename} line {error.lineno}: {text})"
  if isinstance(error, tokenize.TokenError):
    return f"{error.args[0]} (an unclosed bracket or quote in a binding or gin file?)"
  if isinstance(error, OSError) and "Unable to open file" in str(error):
    name = str(error).split("Unable to open file: ", 1)[1].split(". Searched", 1)[0]
    places = ", ".join(str(p) for p in config_search_paths())
    return f"gin file {name!r} not found (looked in {places} and as given)"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message, rest = (lines[0], lines[1:]) if lines else (type(error).__name__, [])
  macro = re.match(r"No bindings specified for '([\w.]+)/gin\.macro'", message)
  if macro:  # gin follows this with the whole config; the name is what matters
    name = macro.group(1)
    return f"macro %{name} is used but not set; set it in a gin file or with --gin.{name}=..."
  # gin appends where: "In bindings string line N" (our MODEL_DIR macro is line 1, so the
  # number misleads) or 'In file "x.gin", line N', then the offending text.
  if rest and rest[0].startswith("In bindings string"):
    message += f" (in the binding {rest[1] if len(rest) > 1 else ''})"
  elif rest and rest[0].startswith("In "):
    message += f" ({rest[0][len('In '):]}: {rest[1] if len(rest) > 1 else ''})"
  return message
