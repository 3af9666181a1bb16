"""What every checkpoint reader offers, and the errors they raise.

A reader presents a checkpoint as arrays keyed by t5x parameter paths (tuples such as
`('encoder', 'layers_0', 'attention', 'query', 'kernel')`) in t5x's layout, whatever the file
format. `shapes()` reads metadata only; `read(path)` reads one array, so a loader can move each
array to its devices (or, later, straight into its shards) before reading the next.
"""

from __future__ import annotations

import abc
from typing import Optional

import numpy as np

from softprompt_jax.errors import UserError
from softprompt_jax.t5_config import T5Config

ParamPath = tuple[str, ...]
ShapeDtype = tuple[tuple[int, ...], np.dtype]


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read: unknown layout, unreadable or refused file."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose arrays do not fit the model: missing, unexpected or mis-shaped arrays.

  `missing`, `unexpected` and `mismatched` hold the offending paths, '/'-joined.
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


class CheckpointReader(abc.ABC):
  """One checkpoint, read array by array. Use as a context manager, or call `close()`."""

  location: str  # The file or directory the arrays come from, for messages.

  @abc.abstractmethod
  def shapes(self) -> dict[ParamPath, ShapeDtype]:
    """{t5x path: (shape, stored dtype)} of every model array in the checkpoint."""

  @abc.abstractmethod
  def read(self, path: ParamPath) -> np.ndarray:
    """The array at `path`, in t5x layout and its stored dtype."""

  @abc.abstractmethod
  def config(self, **overrides) -> T5Config:
    """The model configuration the checkpoint describes, with `overrides` applied."""

  def source_name(self, path: ParamPath) -> Optional[str]:
    """The array's name inside the file where it differs from the t5x path (for messages)."""
    return None

  def close(self) -> None:  # noqa: B027 (a reader with nothing to release keeps this)
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def join_path(path: ParamPath) -> str:
  return "/".join(path)


def is_floating(dtype) -> bool:
  """Whether a stored dtype holds parameter values (ml_dtypes' bfloat16 included)."""
  import jax.numpy as jnp
  return jnp.issubdtype(np.dtype(dtype), jnp.floating)
