"""A frozen T5 converted between a t5x checkpoint and a Hugging Face directory, both ways.

The input is read as `load_t5` reads it (any t5x or Hugging Face layout, every array checked
against the model its configuration implies, pickles refused); the output is a t5x checkpoint
in t5x's legacy layout (t5x_writer.py) or a Hugging Face directory, config.json and
model.safetensors (hf_writer.py), weights stored as float32. The output is assembled in a
temporary directory beside it and renamed into place, so a failed conversion leaves nothing
that looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import shutil
from typing import Optional

from softprompt_jax.checkpoints import loading
from softprompt_jax.checkpoints.hf import HFSafetensorsReader
from softprompt_jax.checkpoints.hf_writer import save_hf_t5
from softprompt_jax.checkpoints.t5x_writer import T5xCheckpointWriter
from softprompt_jax.errors import UsageError
from softprompt_jax.paths import local_path
from softprompt_jax.t5_config import T5Config

FORMATS = {"t5x": "t5x", "hf": "Hugging Face"}
# Fields that shapes cannot show and do not change a frozen model's outputs.
_UNRECORDED_HARMLESS = ("dropout_rate",)


def checkpoint_format(reader) -> str:
  """'hf' or 't5x': the format of an open checkpoint reader."""
  return "hf" if isinstance(reader, HFSafetensorsReader) else "t5x"


def convert_checkpoint(source, destination, *, to: str, source_format: Optional[str] = None,
                       step: int = 0) -> tuple[pathlib.Path, list[str]]:
  """Writes the T5 at `source` to `destination` (new, or an empty directory) in format `to`
  ('hf' or 't5x'; `source_format`, when given, must be what `source` is). `step` is recorded
  in a t5x checkpoint (t5x counts its training steps on from it). Returns (the directory
  written, notes for the user: what the output format cannot record)."""
  for flag, value in (("--to", to), ("--from", source_format)):
    if value is not None and value not in FORMATS:
      raise UsageError(f"{flag} {value!r}: use one of {list(FORMATS)}")
  destination = local_path(destination, "OUT", advice="write locally, then copy").absolute()
  _check_new(destination)
  with loading.open_checkpoint(source) as reader:
    found = checkpoint_format(reader)
    if source_format is not None and source_format != found:
      raise UsageError(f"{source} is a {FORMATS[found]} checkpoint, not --from {source_format}")
    if found == to:
      raise UsageError(f"{source} is already a {FORMATS[to]} checkpoint; nothing to convert")
    config = reader.config()
    expected = loading.expected_param_shapes(config)
    loading.check_shapes(reader, expected, config)
    staging = destination.with_name(f".{destination.name}.tmp-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    try:
      if to == "hf":  # safetensors writes one file from all arrays at once
        save_hf_t5(staging, loading.read_params(reader, expected, lambda path, a: a), config)
      else:
        writer = T5xCheckpointWriter(staging)
        loading.read_params(reader, expected, writer.add)  # each array written as it is read
        writer.finish(step)
      if destination.is_dir():  # empty, checked above
        destination.rmdir()
      os.rename(staging, destination)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  return destination, (_unrecorded(config, destination) if to == "t5x" else [])


def _check_new(destination: pathlib.Path) -> None:
  if destination.is_dir() and any(destination.iterdir()):
    raise UsageError(f"OUT {destination} is a directory that is not empty; give a new one "
                     "(nothing is overwritten)")
  if destination.exists() and not destination.is_dir():
    raise UsageError(f"OUT {destination} is a file; give a new directory")


def _unrecorded(config: T5Config, written: pathlib.Path) -> list[str]:
  """What the written t5x checkpoint reads back as differently from `config`: the settings no
  array's shape shows (relative_attention_max_distance, layer_norm_epsilon)."""
  with loading.open_checkpoint(written) as reader:
    back = reader.config()
  notes = []
  for field in dataclasses.fields(T5Config):
    ours, read = getattr(config, field.name), getattr(back, field.name)
    if ours != read and field.name not in _UNRECORDED_HARMLESS:
      notes.append(f"a t5x checkpoint does not record {field.name} ({ours!r} in the input; "
                   f"read back as {read!r}): load it with frozen_model.overrides="
                   f"{{'{field.name}': {ours!r}}} (and set it in t5x's gin config)")
  return notes
