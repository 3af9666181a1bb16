"""Whether files are the ones written: sha256 sums, and a frozen checkpoint's fingerprint.

A saved training step carries `sha256sums.json` (the sum of each of its files); `damage` tells
a step whose files no longer match it. The shipped tiny model's manifest lists sums the same way
(see `pretrained`). A frozen checkpoint is recorded in a run by `fingerprint`, which hashes big
files only in part: hashing a 40 GB checkpoint at every start would cost minutes.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional

INTEGRITY_FILE = "sha256sums.json"
# Files above this size are fingerprinted by their size and first/last blocks, not fully hashed.
_FULL_HASH_LIMIT = 64 * 2 ** 20
_BLOCK = 16 * 2 ** 20


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
  """A sha256 over a checkpoint's file names, sizes and contents (head and tail of big files)."""
  path = pathlib.Path(path)
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  digest = hashlib.sha256()
  for file in files:
    size = file.stat().st_size
    digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
    with open(file, "rb") as f:
      if size <= _FULL_HASH_LIMIT:
        digest.update(f.read())
      else:
        digest.update(f.read(_BLOCK))
        f.seek(size - _BLOCK)
        digest.update(f.read(_BLOCK))
  return digest.hexdigest()
