"""Whether files are the ones written: sha256 sums, and a frozen checkpoint's fingerprint.

A saved training step carries `sha256sums.json` (the sum of each of its files); `damage` tells
a step whose files no longer match it. The shipped tiny model's manifest lists sums the same way
(see `pretrained`). A frozen checkpoint is recorded in a run by `fingerprint`: its files' names,
sizes and modification times and its small metadata files, never its weights (hashing a 40 GB
checkpoint at every start would cost minutes).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional

from softprompt_jax.paths import local_path

INTEGRITY_FILE = "sha256sums.json"
# Marks the fingerprint's kind: older runs recorded a content hash (bare hex), see `same_model`.
FINGERPRINT_PREFIX = "stat-v2:"
# A checkpoint's own description, hashed in full when small: t5x's msgpack `checkpoint` (array
# specs; it holds the weights themselves in small models), orbax's metadata, Hugging Face's
# config and shard index.
METADATA_FILES = frozenset({"checkpoint", "_METADATA", "_CHECKPOINT_METADATA", "_sharding",
                            "manifest.ocdbt", "config.json", "model.safetensors.index.json"})
_METADATA_LIMIT = 4 * 2 ** 20


def sha256(path: pathlib.Path) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def file_digests(directory: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` but its own INTEGRITY_FILE."""
  return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*"))
          if p.is_file() and p.name != INTEGRITY_FILE}


def damage(directory: pathlib.Path) -> Optional[str]:
  """Why the files under `directory` are not the ones its INTEGRITY_FILE lists (one line), or
  None when they are, or when it has no such file."""
  sums = directory / INTEGRITY_FILE
  if not sums.is_file():
    return None
  try:
    expected = json.loads(sums.read_text())
  except ValueError:
    return f"{sums} is not valid JSON"
  actual = file_digests(directory)
  missing = sorted(set(expected) - set(actual))
  if missing:
    return f"missing files {missing[:3]}"
  changed = sorted(name for name in expected if expected[name] != actual[name])
  if changed:
    return f"contents changed since saving: {changed[:3]}"
  return None


def fingerprint(path) -> str:
  """The identity of a frozen checkpoint, read from the file system, not from the weights:
  FINGERPRINT_PREFIX + a sha256 over every file's name, size and modification time, and over
  the contents of the checkpoint's own small metadata files (METADATA_FILES). A changed,
  touched, added or renamed file changes it; a copy that keeps the times (`cp -p`, rsync -t)
  keeps it."""
  path = local_path(path, "checkpoint")
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  digest = hashlib.sha256()
  for file in files:
    stat = file.stat()
    name = file.relative_to(path) if file != path else file.name
    digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if file.name in METADATA_FILES and stat.st_size <= _METADATA_LIMIT:
      digest.update(file.read_bytes())
  return FINGERPRINT_PREFIX + digest.hexdigest()


def same_model(saved: Optional[str], current: Optional[str]) -> bool:
  """Whether a run's recorded fingerprint allows resuming with the checkpoint fingerprinted now.
  A fingerprint of the older, content-hashing kind (64 hex digits, no prefix) cannot be
  recomputed cheaply: it is accepted, and the run's next checkpoint records the new kind."""
  if isinstance(saved, str) and not saved.startswith(FINGERPRINT_PREFIX) and current:
    return True
  return saved == current
