"""Paths as every path parameter takes them: local only, `~` expanded, URLs refused by name.

Every path a user gives (frozen checkpoint, vocabulary, data, run directory) passes through
`local_path`. A URL (`gs://bucket/run`, `s3://…`, `https://…`) is refused in one line naming the
parameter: `pathlib.Path("gs://bucket/run")` is `gs:/bucket/run`, a local folder that a run
would silently create. Relative paths, `..`, spaces and non-ASCII names are ordinary paths;
`absolute` gives the normalised form that tensorstore's file driver and orbax need.
"""

from __future__ import annotations

import os
import pathlib
import re

from softprompt_jax.errors import UserError

# A scheme of two or more characters, then ':/' (pathlib has already folded '://' to ':/');
# one letter would be a Windows drive ('C:/').
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")


class PathError(UserError, ValueError):
  """A path parameter that cannot name a local file (a URL)."""


def is_url(value: str | os.PathLike) -> bool:
  return bool(_URL.match(os.fspath(value)))


def local_path(value: str | os.PathLike, what: str, *,
               advice: str = "copy it to a local path first",
               error: type[Exception] = PathError) -> pathlib.Path:
  """`value` as a local path with `~` expanded (relative paths stay relative).

  `what` names the parameter in the message (e.g. '--model_dir', 'frozen_model.checkpoint');
  `error` is the UserError type raised for a URL, so callers keep their own error types.
  """
  text = os.fspath(value)
  if is_url(text):
    raise error(f"{what} {text!r} is a URL; only local paths are supported for now ({advice})")
  return pathlib.Path(text).expanduser()


def absolute(path: str | os.PathLike) -> pathlib.Path:
  """`path` absolute, `~` expanded, '..' and symlinks resolved: tensorstore's file driver
  refuses relative paths and '..' segments ('Invalid file path')."""
  return pathlib.Path(os.fspath(path)).expanduser().resolve()
