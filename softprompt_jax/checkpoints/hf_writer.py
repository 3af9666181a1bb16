"""Writes a T5 as a Hugging Face directory (config.json + model.safetensors), without torch."""

from __future__ import annotations

import json
import pathlib

from softprompt_jax.checkpoints.hf_names import hf_config_dict, hf_state_from_params
from softprompt_jax.t5_config import T5Config


def save_hf_t5(directory, params: dict, config: T5Config) -> pathlib.Path:
  """A directory that `load_t5` and transformers' `T5ForConditionalGeneration` both read."""
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(hf_state_from_params(params, config), str(directory / "model.safetensors"),
            metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
  return directory
