"""Writing a whole file, whatever is at its path: the one writer of every file written whole.

User-named outputs (predictions, an exported prompt, a PEFT adapter) and the run directory's own
records (summary.json, curves.png, the gin records, eval_<split>.json, interpretation.json, a
checkpoint's sha256sums.json) all go through `write_text`, `write_bytes` or `open_output`, which
pick one of three ways by what the path is now:

  - `-`, or the very file this process's stdout (or stderr) is: written through that stream, so
    the data and the process's own messages keep their order and nothing is replaced;
  - a regular file, or nothing yet: written atomically (a temporary file in the same directory,
    flushed and fsynced, then renamed over the path), so a reader sees the old file or the new
    one and a failure mid-write leaves the old one; through a symlink, its target is written so
    and the link stays a link;
  - anything else that exists (a named pipe, /dev/null, a terminal, a socket): opened for
    writing and streamed to, never replaced.

A directory where a file is expected is an IsADirectoryError saying so. An OSError while writing
names the output path (not the temporary file), so a full or read-only disk reads as one line;
`naming` gives files written piecemeal (an appended log) the same.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import stat
import sys
from typing import IO, Iterator, Union

STDOUT = "-"

PathLike = Union[str, os.PathLike]


def is_stdout(path: PathLike) -> bool:
  """Whether writing `path` writes this process's stdout (`-`, /dev/stdout, a pipe or file
  that stdout already is); a caller then prints its own messages elsewhere."""
  return _standard_stream(path) is sys.stdout


def is_stream(path: PathLike) -> bool:
  """Whether `path` is written as a stream (stdout, a pipe, a device), not as a file."""
  if _standard_stream(path) is not None:
    return True
  try:
    mode = os.stat(path).st_mode
  except OSError:  # nothing there (yet): a file
    return False
  return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_output_path(path: PathLike) -> None:
  """Fails now, before any work, where `open_output(path)` would fail for what is at the path:
  a directory (IsADirectoryError), or a parent that is a file (NotADirectoryError)."""
  path = os.fspath(path)
  if path == STDOUT:
    return
  if os.path.isdir(path):  # follows a symlink
    raise IsADirectoryError(f"{path} is a directory; give a file path to write")
  parent = pathlib.Path(os.path.realpath(path)).parent
  while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor
    parent = parent.parent
  if not parent.is_dir():
    raise NotADirectoryError(f"cannot write {path}: {parent} is not a directory")


@contextlib.contextmanager
def open_output(path: PathLike, mode: str = "w") -> Iterator[IO]:
  """A file object to write `path` through (mode "w" text, utf-8, or "wb"); see the module
  docstring for how each kind of path is written. The output is complete when the `with` block
  ends without an error."""
  if mode not in ("w", "wb"):
    raise ValueError(f"open_output: mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  standard = _standard_stream(path)
  if standard is not None:
    with _to_standard_stream(standard, mode) as out:
      yield out
    return
  try:
    st = os.stat(path)  # follows symlinks: what a write would reach
  except FileNotFoundError:
    st = None
  if st is None or stat.S_ISDIR(st.st_mode):
    check_output_path(path)
  if st is not None and not stat.S_ISREG(st.st_mode):
    with naming(path), open(path, mode, **_text_args(mode)) as out:  # a pipe or device
      yield out
    return
  with _atomic(pathlib.Path(os.path.realpath(path)), path, mode, st) as out:
    yield out


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (utf-8) to `path` as `open_output` does."""
  with open_output(path, "w") as out:
    out.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` as `open_output` does."""
  with open_output(path, "wb") as out:
    out.write(data)


@contextlib.contextmanager
def naming(path: PathLike, *, instead_of_any: bool = False) -> Iterator[None]:
  """An OSError that names no file (a write() or flush on a full disk) gets `path`, so the one
  line the user sees says which file could not be written; `instead_of_any`: also one that
  names another (a temporary file standing in for `path`)."""
  try:
    yield
  except OSError as error:
    path = os.fspath(path)
    if error.errno is None or error.filename == path or (error.filename is not None
                                                         and not instead_of_any):
      raise
    # OSError(errno, ...) is the subclass the errno calls for, as the original was.
    raise OSError(error.errno, error.strerror or os.strerror(error.errno), path) from error


def _text_args(mode: str) -> dict:
  return {} if "b" in mode else {"encoding": "utf-8"}


def _standard_stream(path: PathLike):
  """sys.stdout / sys.stderr when `path` is `-` or the same file as fd 1 / 2; else None."""
  path = os.fspath(path)
  if path == STDOUT:
    return sys.stdout
  try:
    st = os.stat(path)
  except OSError:
    return None
  for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
    try:
      if os.path.samestat(st, os.fstat(fd)):
        return stream
    except OSError:  # that descriptor is closed
      continue
  return None


@contextlib.contextmanager
def _to_standard_stream(stream, mode: str) -> Iterator[IO]:
  """The stream itself (never closed): text as is, bytes through its buffer after the text
  already written to it."""
  if "b" not in mode:
    yield stream
    stream.flush()
    return
  stream.flush()
  yield stream.buffer
  stream.buffer.flush()


@contextlib.contextmanager
def _atomic(target: pathlib.Path, named: str, mode: str, st) -> Iterator[IO]:
  """Writes `target` by renaming a complete, fsynced temporary file over it; errors name
  `named` (the path the user gave)."""
  with naming(named, instead_of_any=True):
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    # A random name taken with O_EXCL: two writers never share a temporary file; mode 0o666
    # lets the umask decide the permissions, as a plain open() would.
    tmp = parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      with os.fdopen(fd, mode, **_text_args(mode)) as out:
        if st is not None:  # a replaced file keeps its permissions
          os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
        yield out
        out.flush()
        os.fsync(out.fileno())
      os.replace(tmp, target)
    except BaseException:
      # Where the disk allows (not a read-only one): the error that stopped the write is the
      # one to report.
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
      raise
    _fsync_directory(parent)  # the rename itself survives a crash


def _fsync_directory(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # some file systems do not open directories
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)

