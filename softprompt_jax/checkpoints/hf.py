"""Reader for Hugging Face T5 directories: config.json + safetensors (single or sharded).

Arrays are read one at a time with safetensors' `safe_open(..., framework="np")` and renamed and
transposed into t5x's layout by `hf_names`. PyTorch pickles (`pytorch_model.bin`, `.pt`, ...)
are refused by file name, before anything in them is read: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np

from softprompt_jax.checkpoints.checkpoint_reader import (CheckpointError, CheckpointReader,
                                                          ParamPath, ShapeDtype)
from softprompt_jax.checkpoints.hf_names import (HF_LM_HEAD_FALLBACK, HF_TIED_ALIASES,
                                                 config_from_hf, hf_name_map)
from softprompt_jax.t5_config import T5Config

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Model types whose weights and names are T5's (ByT5 says "t5"); umt5 has per-layer biases.
T5_MODEL_TYPES = ("t5", "mt5")

SAFE_ALTERNATIVE = (
    "This library never unpickles (loading a pickle runs whatever code it contains). Convert the "
    "weights to safetensors where you trust them, e.g. with transformers: "
    "`T5ForConditionalGeneration.from_pretrained(src).save_pretrained(dst, "
    "safe_serialization=True)`, then load `dst`.")

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def is_pickle_file(path: pathlib.Path) -> bool:
  name = path.name.lower()
  return name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json")


def refuse_pickle(path: pathlib.Path) -> None:
  """Raises CheckpointError for a pickle file, or a directory whose only weights are pickles."""
  if path.is_file() and is_pickle_file(path):
    raise CheckpointError(f"{path} is a PyTorch pickle; refusing to load it. {SAFE_ALTERNATIVE}")
  if path.is_dir():
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and is_pickle_file(p))
    if pickles and not any(path.glob("*.safetensors")):
      raise CheckpointError(f"{path} holds PyTorch pickle weights only ({', '.join(pickles)}); "
                            f"refusing to load them. {SAFE_ALTERNATIVE}")


def is_hf_checkpoint(path: pathlib.Path) -> bool:
  if path.is_file():
    return path.suffix == ".safetensors" or path.name in (CONFIG_FILE, SAFETENSORS_INDEX)
  return path.is_dir() and ((path / CONFIG_FILE).is_file() or any(path.glob("*.safetensors")))


def _dtype(name: str, where: str) -> np.dtype:
  import jax.numpy as jnp  # knows bfloat16 and the float8 names
  if name not in _SAFETENSORS_DTYPES:
    raise CheckpointError(f"{where}: safetensors dtype {name} is not supported")
  return np.dtype(jnp.dtype(_SAFETENSORS_DTYPES[name]))


def _safe_open(file: pathlib.Path):
  try:
    from safetensors import safe_open
  except ImportError as e:
    raise ImportError("reading Hugging Face checkpoints needs the `safetensors` package "
                      "(pip install safetensors)") from e
  try:
    return safe_open(str(file), framework="np")
  except Exception as e:  # safetensors raises its own SafetensorError for malformed files
    raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


class HFSafetensorsReader(CheckpointReader):
  """A Hugging Face T5 directory, presented in t5x names and layout."""

  def __init__(self, path: pathlib.Path):
    directory = path if path.is_dir() else path.parent
    self.location = str(directory)
    self._hf = _read_config(directory)
    model_type = self._hf.get("model_type", "t5")
    if model_type not in T5_MODEL_TYPES:
      raise CheckpointError(f"{directory / CONFIG_FILE}: model_type {model_type!r} is not a T5 "
                            f"this library loads ({', '.join(T5_MODEL_TYPES)})")
    try:
      file_config = config_from_hf(self._hf)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise CheckpointError(f"{directory / CONFIG_FILE}: not a usable T5 config ({e!r})") from e

    self._file_of: dict[str, pathlib.Path] = {}  # hf name -> safetensors file
    self._stored: dict[str, ShapeDtype] = {}  # hf name -> (shape, dtype), as stored
    for file in _weight_files(directory, path):
      with _safe_open(file) as f:
        for name in f.keys():
          view = f.get_slice(name)
          self._file_of[name] = file
          self._stored[name] = (tuple(view.get_shape()), _dtype(view.get_dtype(), str(file)))

    # t5x path -> (hf name, transpose), for every array the file's own config calls for.
    self._sources: dict[ParamPath, tuple[str, bool]] = {
        tuple(t5x.split("/")): (hf_name, transpose)
        for hf_name, (t5x, transpose) in hf_name_map(file_config).items()}
    lm_head = ("decoder", "logits_dense", "kernel")
    if lm_head in self._sources and "lm_head.weight" not in self._stored:
      self._sources[lm_head] = (HF_LM_HEAD_FALLBACK, True)
    used = {hf_name for hf_name, _ in self._sources.values()}
    ignored = set(HF_TIED_ALIASES)
    if file_config.logits_via_embedding:
      ignored.add("lm_head.weight")  # a stored copy of the tied embedding
    self._unexpected = sorted(set(self._stored) - used - ignored)

  def shapes(self) -> dict[ParamPath, ShapeDtype]:
    out = {}
    for path, (hf_name, transpose) in self._sources.items():
      if hf_name in self._stored:
        shape, dtype = self._stored[hf_name]
        out[path] = (shape[::-1] if transpose else shape, dtype)
    # Arrays no T5 parameter maps to are keyed by their Hugging Face name.
    out.update({(name,): self._stored[name] for name in self._unexpected})
    return out

  def read(self, path: ParamPath) -> np.ndarray:
    hf_name, transpose = self._sources.get(path, (path[0], False))
    file = self._file_of[hf_name]
    try:
      with _safe_open(file) as f:
        array = f.get_tensor(hf_name)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{file}: cannot read {hf_name} ({e})") from e
    return array.T if transpose else array

  def config(self, **overrides) -> T5Config:
    return config_from_hf(self._hf, **overrides)

  def source_name(self, path: ParamPath) -> Optional[str]:
    source = self._sources.get(path)
    return source[0] if source else None


def _read_config(directory: pathlib.Path) -> dict:
  file = directory / CONFIG_FILE
  if not file.is_file():
    raise CheckpointError(f"{directory}: no {CONFIG_FILE}; a Hugging Face T5 checkpoint needs "
                          "it beside its safetensors weights")
  try:
    config = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
  return config


def _weight_files(directory: pathlib.Path, given: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of the checkpoint: every shard of an index, or the one file."""
  index = directory / SAFETENSORS_INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
      raise CheckpointError(f"{index} names shards that are not in {directory}: {missing}")
    return [directory / s for s in shards]
  if given.is_file() and given.suffix == ".safetensors":
    return [given]
  if (directory / SAFETENSORS_FILE).is_file():
    return [directory / SAFETENSORS_FILE]
  candidates = sorted(directory.glob("*.safetensors"))
  if len(candidates) == 1:
    return candidates
  if candidates:
    raise CheckpointError(f"{directory}: several safetensors files "
                          f"({', '.join(c.name for c in candidates)}) and no {SAFETENSORS_INDEX} "
                          "saying which hold the model")
  refuse_pickle(directory)
  raise CheckpointError(f"{directory}: {CONFIG_FILE} but no {SAFETENSORS_FILE} (or sharded "
                        f"{SAFETENSORS_INDEX}) beside it")
