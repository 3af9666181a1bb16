"""IA3 vectors as a PEFT IA3 adapter directory, both ways, without torch.

PEFT's IA3 for T5 (PEFT 0.21, `IA3Config(task_type="SEQ_2_SEQ_LM")`) wraps the `k`, `v` and
`wo` linears of every attention and MLP block; `wo` is a feed-forward module, so its vector
scales the layer's input, [1, d_ff], while those of `k` and `v` scale the output, [N * D, 1].
The adapter directory holds `adapter_config.json` (peft_type IA3) and
`adapter_model.safetensors`, whose keys are the module paths of transformers' T5 under
`base_model.model.` with `.ia3_l` appended, e.g.
`base_model.model.decoder.block.0.layer.1.EncDecAttention.k.ia3_l`.

Ours (methods/ia3.py) are `ia3_key` / `ia3_value` [N, D] beside each attention's projections and
`ia3_mlp` [F] beside each MLP's: the same numbers, reshaped. Reading also takes what PEFT's mt5
default writes: the output of `wi_1` scaled instead of the input of `wo`, which in a gated MLP
(gelu(x W_0) * (x W_1)) multiplies the same activations. Modules an adapter leaves out keep
ones, as PEFT leaves them unscaled.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import output_files
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.peft_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                   read_adapter_config, read_adapter_weights)
from softprompt_jax.t5_config import T5Config

PREFIX = "base_model.model."
SUFFIX = ".ia3_l"
KEY, VALUE, MLP = "ia3_key", "ia3_value", "ia3_mlp"
# What our adapters say: PEFT's own defaults for T5.
TARGET_MODULES = ["k", "v", "wo"]
FEEDFORWARD_MODULES = ["wo"]


def ia3_paths(config: T5Config) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{our parameter path: (PEFT module path, our shape)} of every IA3 vector of a T5 of
  `config`, in the module tree of t5.py (attention, self_attention, encoder_decoder_attention,
  mlp)."""
  heads, mlp = (config.num_heads, config.head_dim), (config.mlp_dim,)
  paths = {}

  def attention(ours, theirs):
    paths[f"{ours}/{KEY}"] = (f"{theirs}.k", heads)
    paths[f"{ours}/{VALUE}"] = (f"{theirs}.v", heads)

  for i in range(config.num_encoder_layers):
    attention(f"encoder/layers_{i}/attention", f"encoder.block.{i}.layer.0.SelfAttention")
    paths[f"encoder/layers_{i}/mlp/{MLP}"] = (f"encoder.block.{i}.layer.1.DenseReluDense.wo",
                                              mlp)
  for i in range(config.num_decoder_layers):
    attention(f"decoder/layers_{i}/self_attention", f"decoder.block.{i}.layer.0.SelfAttention")
    attention(f"decoder/layers_{i}/encoder_decoder_attention",
              f"decoder.block.{i}.layer.1.EncDecAttention")
    paths[f"decoder/layers_{i}/mlp/{MLP}"] = (f"decoder.block.{i}.layer.2.DenseReluDense.wo",
                                              mlp)
  return paths


def ones_vectors(config: T5Config) -> dict:
  """Every IA3 vector of a T5 of `config`, ones (the identity), as a nested params tree."""
  return unflatten_dict({path: np.ones(shape, np.float32)
                         for path, (_, shape) in ia3_paths(config).items()}, sep="/")


def _peft_array(module: str, vector: np.ndarray) -> np.ndarray:
  """PEFT's layout: [1, in] for the feed-forward `wo` (its input scaled), [out, 1] else."""
  flat = np.ascontiguousarray(np.asarray(vector, np.float32).reshape(-1))
  return flat[None, :] if module.endswith(".wo") else flat[:, None]


def save_ia3_adapter(directory, vectors: dict, config: T5Config, *,
                     base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
  """Writes a directory that `peft.PeftModel.from_pretrained(hf_t5, directory)` loads.
  `vectors`: a params tree holding every IA3 vector of `config` (a run's trained subtree).
  Each file is replaced atomically, the weights before the config that announces them."""
  from safetensors.numpy import save
  flat = flatten_dict(vectors, sep="/")
  paths = ia3_paths(config)
  missing = sorted(set(paths) - set(flat))
  if missing:
    raise ValueError(f"no IA3 vector at {missing[:3]} ({len(missing)} missing) for a model "
                     f"of {config.num_encoder_layers}+{config.num_decoder_layers} layers")
  state = {}
  for path, (module, shape) in paths.items():
    if np.shape(flat[path]) != shape:
      raise ValueError(f"{path} has shape {np.shape(flat[path])}, expected {shape}")
    state[PREFIX + module + SUFFIX] = _peft_array(module, flat[path])
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise NotADirectoryError(f"{directory} is not a directory; an IA3 run exports a PEFT "
                             "adapter directory")
  directory.mkdir(parents=True, exist_ok=True)
  adapter_config = {
      "peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM", "target_modules": TARGET_MODULES,
      "feedforward_modules": FEEDFORWARD_MODULES, "exclude_modules": None,
      "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None,
      "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
      "revision": None, "auto_mapping": None,
  }
  output_files.write_bytes(directory / ADAPTER_WEIGHTS, save(state))
  output_files.write_text(directory / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2))
  return directory


def load_ia3_adapter(directory, config: T5Config) -> dict:
  """Every IA3 vector of a T5 of `config` from a PEFT IA3 adapter directory (ones where the
  adapter scales nothing), as a nested params tree: JSON and safetensors only; a pickled
  `adapter_model.bin` is refused by name, unread."""
  read_adapter_config(directory, "IA3", "methods.ia3 reads IA3 adapters")
  weights, weights_path = read_adapter_weights(directory)
  flat = flatten_dict(ones_vectors(config), sep="/")
  for key, array in sorted(weights.items()):
    path, vector = _our_vector(key, np.asarray(array, np.float32), config, weights_path)
    flat[path] = flat[path] * vector  # wo and wi_1 of one MLP both scale its activations
  return unflatten_dict(flat, sep="/")


def _our_vector(key: str, array: np.ndarray, config: T5Config,
                where: pathlib.Path) -> tuple[str, np.ndarray]:
  """(our path, the vector in our shape) of one adapter tensor, or CheckpointError naming it."""
  by_module = {module: (path, shape) for path, (module, shape) in ia3_paths(config).items()}
  gated = len(config.mlp_activations) > 1
  module = key[len(PREFIX):-len(SUFFIX)] if (key.startswith(PREFIX)
                                              and key.endswith(SUFFIX)) else None
  # PEFT's mt5 default scales wi_1's output ([F, 1]): in a gated MLP, the activations wo reads.
  from_wi_1 = (gated and module is not None and module.endswith(".wi_1")
               and array.shape[1:] == (1,))
  if from_wi_1:
    module = module[:-len("wi_1")] + "wo"
  if module not in by_module:
    raise CheckpointError(
        f"{where}: {key!r} is not an IA3 vector this model has; methods.ia3 rescales the keys "
        f"and values of every attention and the MLP activations (PEFT target_modules k, v, wo "
        f"with wo feed-forward{', or wi_1' if gated else ''}) of a T5 with "
        f"{config.num_encoder_layers} encoder and {config.num_decoder_layers} decoder layers")
  path, shape = by_module[module]
  feedforward = module.endswith(".wo") and not from_wi_1
  size = int(np.prod(shape))
  expected = (1, size) if feedforward else (size, 1)
  if array.shape != expected:
    what = "scales its input" if feedforward else "scales its output"
    raise CheckpointError(f"{where}: {key} has shape {array.shape}; on this model "
                          f"({config.num_heads} heads of {config.head_dim}, d_ff "
                          f"{config.mlp_dim}) the vector that {what} is {expected}")
  return path, array.reshape(shape)
