"""Checkpoints shipped inside the package: the tiny byte-level T5 of scripts/pretrain_tiny.py.

`tiny_byt5/` holds config.json + model.safetensors (a Hugging Face T5 directory, as `load_t5`
reads it) and manifest.json: how it was trained, its validation accuracies, and the sha256 of
each file, which `load_tiny` checks before reading the weights.
"""

from __future__ import annotations

import json
import os
import pathlib

from softprompt_jax.checkpoints.integrity import sha256
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.errors import UserError

TINY_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "tiny_byt5"
MANIFEST = "manifest.json"


class ChecksumError(UserError, ValueError):
  """A shipped file whose sha256 is not the one its manifest records."""


def read_manifest(path: os.PathLike | str = TINY_MODEL_DIR) -> dict:
  """The manifest.json of the checkpoint directory `path`."""
  manifest = pathlib.Path(path) / MANIFEST
  if not manifest.is_file():
    raise FileNotFoundError(f"{manifest}: no manifest; run scripts/pretrain_tiny.py to make one")
  return json.loads(manifest.read_text())


def verify_checksums(path: os.PathLike | str = TINY_MODEL_DIR) -> None:
  """Raises (naming the file) unless every file listed in the manifest has its sha256."""
  path = pathlib.Path(path)
  expected = read_manifest(path).get("sha256")
  if not expected:
    raise ChecksumError(f"{path / MANIFEST} lists no sha256 checksums")
  for name, digest in sorted(expected.items()):
    file = path / name
    if not file.is_file():
      raise FileNotFoundError(f"{file}: listed in {MANIFEST} but missing")
    actual = sha256(file)
    if actual != digest:
      raise ChecksumError(f"{file}: sha256 {actual} differs from {digest} in {MANIFEST} (the "
                          "file is corrupt or was changed after pretraining)")


def load_tiny(**overrides):
  """(T5, params) of the shipped tiny byte-level model, after checking its files' sha256.

  `overrides` go to `load_t5` (e.g. dropout_rate=0.1 for prompt tuning with dropout).
  """
  verify_checksums(TINY_MODEL_DIR)
  return load_t5(TINY_MODEL_DIR, **overrides)
