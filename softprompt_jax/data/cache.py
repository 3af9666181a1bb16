"""A small cache of formatted examples read from files, so that one run reads each split once:
its check of the data before training, its training iterator and every evaluation.

An entry is keyed by what was read and how (task, split, bad-records policy, ...) and by the
identity of every file it came from (path, size, modification time, inode, and the contents of
small files): an edited or replaced file is read again. In-memory sources (lists, callables)
are never cached, as they can change without a trace. Only the last few entries are kept
(`MAX_ENTRIES`).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
from typing import Any, Hashable

MAX_ENTRIES = 4
# A source directory with more files than this is not cached: listing it would cost more than
# the cache saves (and such a directory is rarely one dataset).
MAX_FILES = 1000
# Files up to HASH_LIMIT bytes are hashed, HASH_BUDGET bytes in all; the others are known by
# size, time and inode only.
HASH_LIMIT, HASH_BUDGET = 4 * 2 ** 20, 32 * 2 ** 20

_entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()


def files_key(source, split: str) -> tuple | None:
  """What identifies the files `source` holds for `split`; None when it is not files (or too
  many, or unreadable: then the reader reports the problem itself)."""
  if isinstance(source, dict):
    return files_key(source[split], split) if split in source else None
  if not isinstance(source, (str, os.PathLike)):
    return None
  root = pathlib.Path(source).expanduser().resolve()  # one key however the path is spelled
  try:
    if root.is_file():
      files = [root]
    elif root.is_dir():
      files = []
      for directory, _, names in os.walk(root):
        files += [pathlib.Path(directory, name) for name in names]
        if len(files) > MAX_FILES:
          return None
    else:
      return None
    stats, budget = [], HASH_BUDGET
    for file in sorted(files):
      stat = file.stat()
      # Small files are also hashed: modification times tick in milliseconds, so a file
      # rewritten at once with as many bytes (a test, a script) would look unchanged.
      digest = None
      if stat.st_size <= min(HASH_LIMIT, budget):
        digest = hashlib.blake2b(file.read_bytes(), digest_size=16).digest()
        budget -= stat.st_size
      stats.append((str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino, digest))
  except OSError:
    return None
  return (str(root), tuple(stats))


def get(key: Hashable | None):
  """The value cached under `key`, or None."""
  if key is None or key not in _entries:
    return None
  _entries.move_to_end(key)
  return _entries[key]


def put(key: Hashable | None, value) -> None:
  if key is None:
    return
  _entries[key] = value
  _entries.move_to_end(key)
  while len(_entries) > MAX_ENTRIES:
    _entries.popitem(last=False)


def clear() -> None:
  """Forget every entry (frees the examples once no iterator holds them)."""
  _entries.clear()
