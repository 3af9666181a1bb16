"""One named variable (e.g. a trained prompt) read from any checkpoint `load_t5` understands."""

from __future__ import annotations

import numpy as np

from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError, join_path
from softprompt_jax.checkpoints.loading import open_checkpoint


def read_checkpoint_variable(path, variable: str = "prompt/prompt") -> np.ndarray:
  """The float32 array at `variable` ('/'-separated; a unique suffix is enough, so
  'prompt/prompt' finds prompt-tuning's `encoder/prompt/prompt` too)."""
  wanted = tuple(variable.strip("/").split("/"))
  with open_checkpoint(path) as reader:
    paths = list(reader.shapes())
    matches = [p for p in paths if p[-len(wanted):] == wanted]
    if len(matches) != 1:
      prompt_like = [join_path(p) for p in paths if any("prompt" in part for part in p)]
      what = "no" if not matches else f"{len(matches)} ({[join_path(m) for m in matches]})"
      raise CheckpointError(f"{path}: {what} variables match {variable!r}; variables with "
                            f"'prompt' in their path: {prompt_like or 'none'}")
    return np.asarray(reader.read(matches[0]), np.float32)
