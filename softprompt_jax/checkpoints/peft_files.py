"""PEFT adapter directories, whatever the method: `adapter_config.json` (its peft_type says
which) and `adapter_model.safetensors`; prompt-tuning (peft_interop) and IA3 (peft_ia3)
adapters are read through here. JSON and safetensors only: a pickled `adapter_model.bin` is
refused by name, unread."""

from __future__ import annotations

import json
import pathlib

from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(directory, peft_type: str, why: str) -> tuple[dict, pathlib.Path]:
  """(config, its path) of a PEFT adapter directory whose peft_type is `peft_type`; else
  FileNotFoundError or CheckpointError naming the file (`why`: what the reader needs)."""
  config_path = pathlib.Path(directory) / ADAPTER_CONFIG
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter directory")
  try:
    config = json.loads(config_path.read_text())
    found = config.get("peft_type")
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
    raise CheckpointError(f"{config_path}: not a PEFT adapter config ({e!r})") from None
  if found != peft_type:
    raise CheckpointError(f"{config_path}: peft_type is {found!r}; {why}")
  return config, config_path


def read_adapter_weights(directory) -> tuple[dict, pathlib.Path]:
  """({name: array}, their path) of a PEFT adapter directory's safetensors file; a pickled
  `adapter_model.bin` is refused by name, unread (unpickling runs whatever code it holds)."""
  from safetensors.numpy import load_file
  weights_path = pathlib.Path(directory) / ADAPTER_WEIGHTS
  if not weights_path.is_file():
    bin_path = pathlib.Path(directory) / "adapter_model.bin"
    if bin_path.exists():
      raise CheckpointError(f"{bin_path} is a PyTorch pickle; refusing to load it (unpickling "
                            "runs whatever code it holds). Re-save the adapter with safetensors "
                            "where you trust it: `peft_model.save_pretrained(dst, "
                            "safe_serialization=True)`")
    raise FileNotFoundError(f"{weights_path} not found")
  try:
    return load_file(str(weights_path)), weights_path
  except Exception as e:  # safetensors raises its own SafetensorError for malformed files
    raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from None
