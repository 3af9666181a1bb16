"""The errors a user can act on, and how one is told in one line.

Each says what is wrong with the configuration, the inputs or the machine, and what to do. The
command line prints any `UserError` (and a missing file, a refused permission, a full or
read-only disk) as one line, exit 2; a traceback would only hide the message. Anything else is a
bug and keeps its traceback. The modules that raise them define their own (`DataError`,
`CheckpointError`, `PromptShapeError`, …), each a `UserError`; the ones with no better home are
here.
"""

from __future__ import annotations

import errno
import os
from typing import Optional


class UserError(Exception):
  """A configuration, input or environment the user must change; printed as one line."""


class ConfigError(UserError, ValueError):
  """A run configuration that cannot work; raised before any expensive step."""


class UsageError(UserError, ValueError):
  """A command line that cannot work (an unknown argument, a missing option)."""


class NumericalError(UserError, FloatingPointError):
  """NaN or Inf in the loss or the prompt; the last good checkpoint is kept."""


# Built-in errors whose message already names the path and the problem.
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# A file system that refuses a write: full, over quota or read-only. The user frees space or
# points the run elsewhere; a traceback would add nothing.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def unwrap(error: BaseException) -> BaseException:
  """The exception gin re-raised with its call location appended to the message (gin wraps it
  in a proxy class whose __context__ is the original)."""
  # jaxlib's exception types have an __init__ without a __qualname__.
  while ("augment_exception_message_and_reraise"
         in (getattr(type(error).__init__, "__qualname__", None) or "")
         and error.__context__ is not None):
    error = error.__context__
  return error


def is_user_error(error: BaseException) -> bool:
  """Whether `error` says what is wrong and what to do (so one line tells it all)."""
  error = unwrap(error)
  return isinstance(error, (UserError,) + _FILE_ERRORS) or disk_error(error) is not None


def disk_error(error: BaseException) -> Optional[OSError]:
  """The OSError (possibly raised inside a library, as the cause or context of its own error)
  whose errno says the disk refused a write; None if there is none."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
      return error
    error = error.__cause__ or error.__context__
  return None


def describe_disk_error(error: OSError) -> str:
  where = f" {error.filename}" if error.filename else ""
  return (f"cannot write{where}: {error.strerror or os.strerror(error.errno)}; free space or "
          "make it writable (or choose another path), then run the same command again (train "
          "resumes from its last checkpoint)")


def one_line(error: BaseException, max_parts: int = 12) -> str:
  """The error's message on one line: gin's appended call location dropped, the lines of a
  multi-line message (a checkpoint mismatch lists one array a line) joined with '; '."""
  disk = disk_error(error)
  if disk is not None:
    return describe_disk_error(disk)
  lines = [line.strip() for line in str(unwrap(error)).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) > max_parts:
    lines = lines[:max_parts] + [f"... {len(lines) - max_parts} more (--traceback shows all)"]
  text = lines[0]
  for line in lines[1:]:
    text += (" " if text.endswith(":") else "; ") + line
  return text
