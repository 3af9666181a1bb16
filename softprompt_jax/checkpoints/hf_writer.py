"""Writes a T5 as a Hugging Face directory (config.json + model.safetensors), without torch."""

from __future__ import annotations

import json
import os
import pathlib
import stat

from softprompt_jax.checkpoints.hf_names import hf_config_dict, hf_state_from_params
from softprompt_jax.t5_config import T5Config


def save_hf_t5(directory, params: dict, config: T5Config) -> pathlib.Path:
  """A directory that `load_t5` and transformers' `T5ForConditionalGeneration` both read."""
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  weights, config_file = directory / "model.safetensors", directory / "config.json"
  save_file(hf_state_from_params(params, config), str(weights), metadata={"format": "pt"})
  config_file.write_text(json.dumps(hf_config_dict(config), indent=2))
  # safetensors creates its file owner-only; give it the permissions any new file gets here.
  os.chmod(weights, stat.S_IMODE(os.stat(config_file).st_mode))
  return directory
