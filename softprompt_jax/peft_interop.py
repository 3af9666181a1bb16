"""A soft prompt as a PEFT prompt-tuning adapter directory, both ways, without torch.

PEFT's format: `adapter_config.json` (peft_type PROMPT_TUNING) and `adapter_model.safetensors`
holding `prompt_embeddings` [num_virtual_tokens * num_transformer_submodules, token_dim]. Ours is
an encoder-side prompt and we write `num_transformer_submodules` 1. PEFT's seq2seq default is 2
rows per virtual token, [encoder half; decoder half], but its seq2seq prompt tuning (forward and
generate of PeftModelForSeq2SeqLM, PEFT 0.21) prepends only the first num_virtual_tokens rows, to
the encoder input: the decoder half is never used, so reading the first half is exact
(tests/test_peft_oracle.py compares PEFT's logits for such an adapter with ours).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import numpy as np

from softprompt_jax import output_files
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.hf import CONFIG_FILE as HF_CONFIG_FILE, is_hf_checkpoint
from softprompt_jax.checkpoints.peft_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                   read_adapter_config, read_adapter_weights)
from softprompt_jax.errors import UsageError
from softprompt_jax.paths import is_url, local_path

PROMPT_KEY = "prompt_embeddings"


def save_peft_adapter(directory, prompt_PxH, *, num_layers: int, num_heads: int,
                      base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
  """Writes a directory that `peft.PeftModel.from_pretrained(hf_t5, directory)` loads. Each
  file is replaced atomically (output_files), the weights before the config that announces
  them; a symlink to a directory is written through."""
  from safetensors.numpy import save
  prompt = np.ascontiguousarray(np.asarray(prompt_PxH, np.float32))
  if prompt.ndim != 2:
    raise ValueError(f"a PEFT prompt is [num_virtual_tokens, token_dim], got {prompt.shape}")
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise NotADirectoryError(f"{directory} is not a directory; a PEFT adapter is a directory "
                             "(give a path ending in .npy for a single prompt file)")
  directory.mkdir(parents=True, exist_ok=True)
  config = {
      "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM",
      "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
      "num_transformer_submodules": 1, "num_attention_heads": int(num_heads),
      "num_layers": int(num_layers), "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
      "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
      "revision": None, "modules_to_save": None, "auto_mapping": None,
  }
  output_files.write_bytes(directory / ADAPTER_WEIGHTS, save({PROMPT_KEY: prompt}))
  output_files.write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2))
  return directory


def load_peft_adapter(directory) -> np.ndarray:
  """The encoder prompt [P, H] of a PEFT prompt-tuning adapter directory: JSON and safetensors
  only; a pickled `adapter_model.bin` is refused by name, unread."""
  config, config_path = read_adapter_config(directory, "PROMPT_TUNING",
                                            "only PROMPT_TUNING adapters hold a soft prompt")
  try:
    tokens = int(config["num_virtual_tokens"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: not a PEFT adapter config ({e!r})") from None
  submodules = _submodules(config, config_path)
  weights, weights_path = read_adapter_weights(directory)
  if PROMPT_KEY not in weights:
    raise CheckpointError(f"{weights_path}: no '{PROMPT_KEY}' tensor (found {sorted(weights)})")
  prompt = np.asarray(weights[PROMPT_KEY], np.float32)
  if submodules is None:  # an older or hand-written config: the rows tell
    submodules = 2 if _is_seq2seq(config) and prompt.shape[:1] == (2 * tokens,) else 1
  if prompt.ndim != 2 or prompt.shape[0] != tokens * submodules:
    raise CheckpointError(f"{weights_path}: {PROMPT_KEY} has shape {prompt.shape} but "
                          f"num_virtual_tokens is {tokens} and num_transformer_submodules "
                          f"{submodules} (expected {tokens * submodules} rows)")
  # With 2 submodules the rows are [encoder half; decoder half]; PEFT feeds T5 the first only.
  return prompt[:tokens]


def _is_seq2seq(config: dict) -> bool:
  return config.get("task_type") == "SEQ_2_SEQ_LM"


def _submodules(config: dict, config_path: pathlib.Path) -> Optional[int]:
  """num_transformer_submodules as PEFT reads it (None: not in the file); CheckpointError for a
  layout whose prompt is not the encoder prompt our model takes."""
  submodules = config.get("num_transformer_submodules")
  if submodules is None:
    return None
  if type(submodules) is not int or submodules not in (1, 2):
    raise CheckpointError(f"{config_path}: num_transformer_submodules is {submodules!r}; a T5 "
                          "prompt-tuning adapter has 1 (an encoder prompt) or 2 (PEFT's seq2seq "
                          "default)")
  if submodules == 2 and not _is_seq2seq(config):
    raise CheckpointError(f"{config_path}: num_transformer_submodules is 2 with task_type "
                          f"{config.get('task_type')!r}; only a SEQ_2_SEQ_LM adapter's first half "
                          "is a T5 encoder prompt. Re-create the PEFT config with "
                          "task_type='SEQ_2_SEQ_LM' and num_transformer_submodules=1")
  return submodules


def adapter_base_model(base_model: Optional[str], run_checkpoint: Optional[str],
                       width: int) -> Optional[str]:
  """An adapter's base_model_name_or_path (what AutoPeftModel loads): `base_model` (a hub id as
  given; a local Hugging Face directory absolute, its d_model checked against `width`), else the
  run's frozen checkpoint when that is a Hugging Face directory (or a file in one) still there,
  else None."""
  if base_model is not None:
    return _base_model_name(base_model, "--base_model", width)
  if not run_checkpoint:
    return None
  path = local_path(run_checkpoint, "the run's frozen_model.checkpoint")
  directory = path.parent if path.is_file() else path
  if not (directory.is_dir() and is_hf_checkpoint(directory)
          and (directory / HF_CONFIG_FILE).is_file()):
    return None
  return _base_model_name(str(directory), "the run's frozen_model.checkpoint", width)


def _base_model_name(name: str, what: str, width: int) -> str:
  if is_url(name):
    raise UsageError(f"{what} {name!r} is a URL; give a hub id (org/name) or a local Hugging "
                     "Face model directory")
  path = local_path(name, what)
  if not path.exists():
    if name.startswith(("/", ".", "~")):  # a path, not a hub id: a typo must not pass
      raise FileNotFoundError(f"{what} {name}: no such directory; give a hub id (org/name) or "
                              "a local Hugging Face model directory")
    return name
  if not (path.is_dir() and (path / HF_CONFIG_FILE).is_file()):
    raise UsageError(f"{what} {path} is not a Hugging Face model directory (no {HF_CONFIG_FILE}"
                     "); give one, or a hub id")
  try:
    d_model = json.loads((path / HF_CONFIG_FILE).read_text()).get("d_model")
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
    raise CheckpointError(f"{path / HF_CONFIG_FILE}: not a readable config ({e})") from None
  if d_model is not None and d_model != width:
    raise CheckpointError(f"{what} {path} has d_model {d_model} but the run's model is {width} "
                          "wide; give the model the run was trained with")
  return os.path.abspath(path)  # PEFT loads it from any working directory; symlinks kept
