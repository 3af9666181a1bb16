"""The gin names of softprompt_jax's configurables, and config parsing as t5x does it.

The library's functions stay plain; they are registered here, once, under short module-style
names (`train`, `frozen_model`, `optim.adafactor`, `prompts.class_labels`, ...), so gin files read
like t5x's.
"""

from __future__ import annotations

import importlib.resources
import logging
import pathlib
from typing import Sequence

import gin

from softprompt_jax import inference, model_spec, optim, prompts, trainer

_REGISTERED: dict = {}


def register() -> dict:
  """Registers every configurable (idempotent); returns {name: configurable}."""
  if _REGISTERED:
    return _REGISTERED
  entries = [
      (trainer.train, "train", None), (inference.evaluate, "evaluate", None),
      (inference.infer, "infer", None), (inference.interpret_prompt, "interpret", None),
      (model_spec.frozen_model, "frozen_model", None),
      (optim.adafactor, "adafactor", "optim"), (optim.adam, "adam", "optim"),
  ]
  for name in ("random_uniform", "sampled_vocab", "class_labels", "from_text", "from_npy",
               "from_t5x_checkpoint"):
    entries.append((getattr(prompts, name), name, "prompts"))
  for fn, name, module in entries:
    key = f"{module}.{name}" if module else name
    _REGISTERED[key] = gin.external_configurable(fn, name=name, module=module)
  return _REGISTERED


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


def parse(gin_files: Sequence[str], bindings: Sequence[str], model_dir: str | None) -> None:
  """Files in order, then bindings (as t5x: later wins); MODEL_DIR from --model_dir.

  An unknown configurable or parameter raises gin's own error here, before any work.
  """
  register()
  gin.clear_config()
  for path in config_search_paths():
    gin.add_config_file_search_path(str(path))
  macro = [f"MODEL_DIR = {model_dir!r}"] if model_dir is not None else ["MODEL_DIR = None"]
  # gin logs an error for every search path a file is not in before finding it; a file found
  # nowhere still raises, so those messages are noise.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), macro + list(bindings),
                                        finalize_config=False)
  finally:
    root.setLevel(level)
  gin.finalize()
