"""Which frozen T5 a run uses: a checkpoint to load, or a named configuration to initialise.

Loading goes straight into the run's shards (`place`); a configuration without a checkpoint is
initialised randomly inside a jit whose outputs are already sharded, so no host ever holds the
whole model. `frozen_dtype` sets how the frozen weights are stored (bfloat16 halves their memory;
the model computes in its activation dtype either way, and the prompt stays float32).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax.checkpoints import loading
from softprompt_jax.paths import local_path
from softprompt_jax.t5 import T5
from softprompt_jax.t5_config import FAMILIES, SIZES, T5Config, t5_config, tiny_config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  checkpoint: Optional[str] = None
  family: str = "t5_1_1"
  size: str = "base"
  overrides: tuple = ()
  seed: int = 0
  frozen_dtype: str = "float32"

  def check(self) -> None:
    """ValueError for a setting no model can have (before anything is read)."""
    if self.frozen_dtype not in FROZEN_DTYPES:
      raise ValueError(f"frozen_model.frozen_dtype={self.frozen_dtype!r}: use one of "
                       f"{list(FROZEN_DTYPES)} (float32 is exact; bfloat16 halves the frozen "
                       "weights' memory)")

  def config(self) -> T5Config:
    """The configuration implied without reading a checkpoint (random-init runs)."""
    overrides = dict(self.overrides)
    if self.size == "tiny":
      return tiny_config(self.family, **overrides)
    return t5_config(self.size, self.family, **overrides)

  def describe(self) -> dict:
    return {"checkpoint": self.checkpoint, "family": self.family, "size": self.size,
            "overrides": dict(self.overrides), "seed": self.seed,
            "frozen_dtype": self.frozen_dtype}


FROZEN_DTYPES = ("float32", "bfloat16", "float16")

FROZEN_MODEL_RULES = {
    "checkpoint": cc.path(optional=True), "family": cc.one_of(*FAMILIES),
    "size": cc.one_of("tiny", *SIZES["t5_1_1"]),
    "overrides": cc.instance(dict, "a dict of T5Config fields", optional=True),
    "seed": cc.SEED,
    "frozen_dtype": cc.Rule(f"one of {list(FROZEN_DTYPES)}",
                            lambda v: jnp.dtype(v).name in FROZEN_DTYPES),
}


def frozen_model(checkpoint: Optional[str] = None, family: str = "t5_1_1", size: str = "base",
                 overrides: Optional[dict] = None, seed: int = 0,
                 frozen_dtype: str = "float32") -> ModelSpec:
  """The frozen model of a run (gin: `train.model = @frozen_model()`).

  With `checkpoint` (t5x `checkpoint_N/` or a Hugging Face directory) the configuration comes
  from the checkpoint and `overrides` adjust it (e.g. dtype='bfloat16'); without one, a randomly
  initialised `family`/`size` model ('tiny' for tests) is used. `frozen_dtype`: how the frozen
  weights are stored ('float32', exact; 'bfloat16' halves their memory, logits then differ from
  float32 by bfloat16 rounding). Trainable parameters and optimizer state are float32 always.
  """
  cc.check("frozen_model", locals(), FROZEN_MODEL_RULES)
  if checkpoint is not None:  # a URL is refused here, before anything is read
    checkpoint = str(local_path(checkpoint, "frozen_model.checkpoint",
                                advice="copy the checkpoint to a local directory first"))
  return ModelSpec(checkpoint, family, size, tuple(sorted((overrides or {}).items())), seed,
                   jnp.dtype(frozen_dtype).name if not isinstance(frozen_dtype, str)
                   else frozen_dtype)


def load_frozen(spec: ModelSpec, partitioner=None, **config_overrides) -> tuple[T5Config, dict]:
  """(config, params) of the frozen T5, each array placed in its shards on `partitioner`'s mesh
  as it is read (or initialised) and stored in `spec.frozen_dtype`; without a partitioner, on
  the default device. A checkpoint is opened once: its configuration, the shapes check and the
  weights all come from one reader."""
  spec.check()
  dtype = jnp.dtype(spec.frozen_dtype)
  overrides = {**dict(spec.overrides), **config_overrides}
  if spec.checkpoint:
    overrides = loading.checked_overrides(overrides)
    with loading.open_checkpoint(spec.checkpoint) as reader:
      config = reader.config(**overrides)
      expected = loading.expected_param_shapes(config)
      loading.check_shapes(reader, expected, config)
      place = (loading.default_place if partitioner is None
               else partitioner.place(partitioner.param_shardings(T5(config))))
      # Cast on the host, one array at a time: a float32 copy of the whole model never exists.
      stored = lambda path, array: place(path, np.asarray(array).astype(dtype, copy=False))
      return config, loading.read_params(reader, expected, stored)
  config = dataclasses.replace(spec.config(), **config_overrides)
  model = T5(config)
  tokens = jnp.ones((1, 8), jnp.int32)
  init = lambda rng: jax.tree_util.tree_map(lambda x: x.astype(dtype),
                                            model.init(rng, tokens, tokens)["params"])
  out_shardings = None if partitioner is None else partitioner.param_shardings(model)
  return config, jax.jit(init, out_shardings=out_shardings)(jax.random.PRNGKey(spec.seed))
