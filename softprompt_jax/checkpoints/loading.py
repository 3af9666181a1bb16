"""`load_t5`: a frozen T5 and its parameters from a t5x or Hugging Face checkpoint.

Formats (see t5x.py and hf.py beside this file): legacy t5x msgpack + zarr checkpoints,
t5x's orbax checkpoints (`checkpoint_N/state/`), and Hugging Face directories with config.json
and safetensors. The checkpoint's arrays are checked against the parameter shapes of
`T5(config)` before any is read; then each is read, cast to float32 and placed on device before
the next is read, so host memory holds one array at a time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.checkpoints import hf, t5x
from softprompt_jax.checkpoints.checkpoint_reader import (CheckpointError,
                                                          CheckpointMismatchError,
                                                          CheckpointReader, ParamPath,
                                                          is_floating, join_path)
from softprompt_jax.paths import local_path
from softprompt_jax.t5 import T5
from softprompt_jax.t5_config import T5Config

# place(path, float32 numpy array) -> the parameter as it should live (on device, sharded, ...).
Place = Callable[[ParamPath, np.ndarray], jax.Array]


def default_place(path: ParamPath, array: np.ndarray) -> jax.Array:
  del path
  return jnp.asarray(array)


def load_t5(path: os.PathLike | str, *, place: Optional[Place] = None,
            **overrides: Any) -> tuple[T5, dict]:
  """(T5(config), params) from the checkpoint at `path`.

  `path`: a legacy t5x `checkpoint_N/` directory or its `checkpoint` file, a t5x orbax
  `checkpoint_N/` (or its `state/`), a t5x model directory (its highest `checkpoint_N` is used),
  or a Hugging Face directory with config.json and model.safetensors (or sharded safetensors
  with model.safetensors.index.json).
  `overrides`: T5Config fields replacing what the checkpoint says or implies, e.g.
  `dtype="bfloat16"`, `dropout_rate=0.0`, `relative_attention_max_distance=...` (t5x checkpoints
  cannot tell it; 128 by default).
  `place`: called as `place(path_tuple, float32_numpy_array)` for each array in turn; its result
  goes into params. Defaults to `jnp.asarray`; pass one that shards to load straight into a mesh.

  Returns params as a nested dict of float32 arrays with t5x's paths
  (`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`, ...). Raises
  CheckpointMismatchError (a ValueError) listing every missing, unexpected or mis-shaped array,
  CheckpointError for unreadable or refused files, FileNotFoundError for a path that does not
  exist, TypeError for an unknown override.
  """
  overrides = checked_overrides(overrides)
  with open_checkpoint(path) as reader:
    config = reader.config(**overrides)
    expected = expected_param_shapes(config)
    check_shapes(reader, expected, config)
    params = read_params(reader, expected, place or default_place)
  return T5(config), params


def open_checkpoint(path: os.PathLike | str) -> CheckpointReader:
  """The reader for whatever checkpoint format is at `path` (see `load_t5`)."""
  path = local_path(path, "checkpoint", error=CheckpointError,
                    advice="copy the checkpoint to a local directory first, e.g. `gsutil -m cp -r`")
  if not path.exists():
    hint = (" (a TensorFlow checkpoint prefix? those are not supported)"
            if path.with_name(path.name + ".index").exists() else "")
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist{hint}")
  hf.refuse_pickle(path)
  if hf.is_hf_checkpoint(path):
    return hf.HFSafetensorsReader(path)
  found = t5x.find_t5x_checkpoint(path)
  if found is not None:
    return t5x.open_t5x(*found)
  listing = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
  raise CheckpointError(
      f"{path} is not a checkpoint this library reads: expected a t5x `checkpoint` file or "
      "`checkpoint_N/` directory, an orbax `state/` directory, or a Hugging Face directory with "
      f"{hf.CONFIG_FILE} and safetensors" + (f"; it holds {listing}" if path.is_dir() else ""))


def expected_param_shapes(config: T5Config) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """{t5x path: shape} of T5(config)'s parameters, traced without computing them."""
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  variables = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens, tokens)
  return flatten_dict(variables["params"])


def check_shapes(reader: CheckpointReader, expected: dict[ParamPath, Any],
                 config: Optional[T5Config] = None) -> None:
  """Raises one CheckpointMismatchError naming every array that does not fit `expected`."""
  found = reader.shapes()
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = sorted(p for p in set(expected) & set(found)
                      if tuple(found[p][0]) != tuple(expected[p].shape)
                      or not is_floating(found[p][1]))
  if not (missing or unexpected or mismatched):
    return

  def name(path):
    source = reader.source_name(path)
    return join_path(path) + (f" [{source}]" if source else "")

  def found_str(path):
    shape, dtype = found[path]
    return f"{tuple(shape)} {np.dtype(dtype).name}"

  lines = [f"missing     {name(p)}: expected {tuple(expected[p].shape)}, found nothing"
           for p in missing]
  lines += [f"wrong shape {name(p)}: expected {tuple(expected[p].shape)} float, "
            f"found {found_str(p)}" for p in mismatched]
  lines += [f"unexpected  {name(p)}: expected nothing, found {found_str(p)}"
            for p in unexpected]
  counts = f"{len(missing)} missing, {len(mismatched)} mis-shaped, {len(unexpected)} unexpected"
  about = f" for {config}" if config is not None else ""
  raise CheckpointMismatchError(
      f"checkpoint {reader.location} does not fit the model{about} ({counts} arrays; override "
      "config fields if the checkpoint is right):\n  " + "\n  ".join(lines),
      missing=[join_path(p) for p in missing], unexpected=[join_path(p) for p in unexpected],
      mismatched=[join_path(p) for p in mismatched])


def read_params(reader: CheckpointReader, expected: dict[ParamPath, Any],
                place: Place = default_place) -> dict:
  """Nested params: each array read, cast to float32 and placed before the next is read."""
  flat = {}
  for path in sorted(expected):
    array = reader.read(path)
    if tuple(array.shape) != tuple(expected[path].shape):
      raise CheckpointMismatchError(
          f"checkpoint {reader.location}: {join_path(path)} read as {array.shape}, "
          f"expected {tuple(expected[path].shape)}", mismatched=[join_path(path)])
    array = array.astype(np.float32, copy=False)
    flat[path] = place(path, array)
    del array  # the placed copy is the only one kept
  return unflatten_dict(flat)


def checked_overrides(overrides: dict[str, Any], who: str = "load_t5") -> dict[str, Any]:
  """`overrides` with dtypes as names; TypeError naming any that is no T5Config field."""
  known = [f.name for f in dataclasses.fields(T5Config)]
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    hints = [f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u)
             for u in unknown for close in [difflib.get_close_matches(u, known, n=1)]]
    raise TypeError(f"{who}: unknown config override {', '.join(hints)}; T5Config fields are "
                    f"{known}")
  overrides = dict(overrides)
  if "dtype" in overrides and not isinstance(overrides["dtype"], str):
    overrides["dtype"] = jnp.dtype(overrides["dtype"]).name  # jnp.bfloat16 -> "bfloat16"
  return overrides
