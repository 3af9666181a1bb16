"""The prompt initializers a run can name, and prompt files.

`INITIALIZERS` is the registry gin knows (`@prompts.<name>`): the ones that make a prompt from
the model's embedding table (`prompt_init`), and the ones that read one from a file here: a
`.npy` array (the released prompts' format), a t5x checkpoint's variable, a PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Optional

import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import output_files
from softprompt_jax.checkpoints.prompt_variable import read_checkpoint_variable
from softprompt_jax.errors import UserError
from softprompt_jax.paths import local_path
from softprompt_jax.peft_interop import load_peft_adapter
# The registry's members from the embedding table, and their types, under this module's name.
from softprompt_jax.prompt_init import (NUM_SPECIAL_IDS, PromptInit, PromptShapeError,  # noqa: F401
                                        check_fits, class_labels, from_array, from_text,
                                        random_uniform, sampled_vocab)
from softprompt_jax.prompt_init import INITIALIZER_RULES as _EMBEDDING_RULES

_NPY_MAGIC = b"\x93NUMPY"


class PromptFileError(UserError, ValueError):
  """A prompt file that is not a plain float array (a pickle, an .npz, a truncated file)."""


INITIALIZER_RULES = {
    **_EMBEDDING_RULES,
    "from_npy": {"path": cc.path(optional=True)},
    "from_t5x_checkpoint": {"path": cc.path(), "variable": cc.text()},
    "from_peft_adapter": {"path": cc.path()},
}


def from_npy(path: Optional[str]) -> PromptInit:
  """A prompt saved as `.npy` float32 [P, H] (the released prompts' format); never unpickles."""
  cc.check("prompts.from_npy", locals(), INITIALIZER_RULES["from_npy"])
  if path is None:
    raise PromptFileError("prompts.from_npy: no prompt file given; set PROMPT_FILE (or "
                          "prompts.from_npy.path) to a .npy [prompt_length, d_model] file")
  return from_array(load_npy(path), source=str(path))


def from_peft_adapter(path: str) -> PromptInit:
  """The prompt of a PEFT prompt-tuning adapter directory (json + safetensors; never unpickles)."""
  cc.check("prompts.from_peft_adapter", locals(), INITIALIZER_RULES["from_peft_adapter"])
  return from_array(load_peft_adapter(path), source=str(path))


def load_npy(path: str) -> np.ndarray:
  """A float [P, H] (or [N, P, H]) array from a `.npy` file. Pickled payloads (raw pickles,
  object arrays) are refused without being unpickled: numpy reads with allow_pickle=False."""
  path = local_path(path, "the prompt file", error=PromptFileError)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {path} does not exist")
  with open(path, "rb") as f:
    magic = f.read(len(_NPY_MAGIC))
  if magic != _NPY_MAGIC:
    if magic[:1] == b"\x80":  # pickle protocol 2+
      what = "a pickle, refused (unpickling runs whatever code it holds)"
    elif magic[:4] == b"PK\x03\x04":
      what = "an .npz archive, not a .npy array"
    else:
      what = "not a .npy file"
    raise PromptFileError(f"{path}: {what}; save the prompt with numpy.save as a float "
                          "[prompt_length, d_model] array")
  try:
    values = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise PromptFileError(f"{path}: not a plain .npy array (pickled objects are refused): "
                          f"{e}") from None
  except (EOFError, OSError) as e:
    raise PromptFileError(f"{path}: a truncated or unreadable .npy file ({e})") from None
  if values.ndim not in (2, 3) or not np.issubdtype(values.dtype, np.floating):
    raise PromptShapeError(f"{path}: expected a float [prompt_length, d_model] array, got "
                           f"{values.dtype} {values.shape}")
  return values.astype(np.float32)


def save_npy(path: str, prompt_PxH) -> None:
  """Writes [P, H] float32 `.npy`, the format the released prompts use, through output_files: a
  file is replaced atomically (a crash never leaves a half-written prompt under its name), `-`
  or a pipe or device is streamed to."""
  values = np.asarray(prompt_PxH, np.float32)
  if values.ndim != 2:
    raise PromptShapeError(f"save_npy: a prompt is [prompt_length, d_model], got {values.shape}")
  buffer = io.BytesIO()  # np.save asks a real file for its position, which a pipe has not
  np.save(buffer, values, allow_pickle=False)
  output_files.write_bytes(path, buffer.getvalue())


def from_t5x_checkpoint(path: str, variable: str = "prompt/prompt") -> PromptInit:
  """A prompt variable stored in a t5x checkpoint (e.g. a prompt-tuning run's output)."""
  cc.check("prompts.from_t5x_checkpoint", locals(), INITIALIZER_RULES["from_t5x_checkpoint"])
  return from_array(read_checkpoint_variable(path, variable), source=f"{path} ({variable})")


@dataclasses.dataclass(frozen=True)
class Initializer:
  """A registered initializer factory and what the run passes it besides its gin-bound
  parameters: `labels` (the task's class labels, as a list of strings) and `vocabulary` (the
  run's tokenizer), each as a keyword argument of that name. It returns a `PromptInit`,
  `init(rng, shape, embedding_VxH) -> prompt`."""
  factory: Callable[..., PromptInit]
  needs_labels: bool = False
  needs_vocabulary: bool = False


# The initializers a gin file can name as @prompts.<name> (gin_setup registers each one).
INITIALIZERS: dict[str, Initializer] = {}


def register_initializer(name: str, factory: Callable[..., PromptInit], *,
                         needs_labels: bool = False, needs_vocabulary: bool = False) -> None:
  INITIALIZERS[name] = Initializer(factory, needs_labels, needs_vocabulary)


register_initializer("random_uniform", random_uniform)
register_initializer("sampled_vocab", sampled_vocab)
register_initializer("class_labels", class_labels, needs_labels=True, needs_vocabulary=True)
register_initializer("from_text", from_text, needs_vocabulary=True)
register_initializer("from_npy", from_npy)
register_initializer("from_t5x_checkpoint", from_t5x_checkpoint)
register_initializer("from_peft_adapter", from_peft_adapter)
