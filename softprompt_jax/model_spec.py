"""Which frozen T5 a run uses: a checkpoint to load, or a named configuration to initialise.

Loading goes straight into the run's shards (`place`); a configuration without a checkpoint is
initialised randomly inside a jit whose outputs are already sharded, so no host ever holds the
whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from softprompt_jax.t5 import T5
from softprompt_jax.t5_config import T5Config, t5_config, tiny_config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  checkpoint: Optional[str] = None
  family: str = "t5_1_1"
  size: str = "base"
  overrides: tuple = ()
  seed: int = 0

  def config(self) -> T5Config:
    """The configuration implied without reading a checkpoint (random-init runs)."""
    overrides = dict(self.overrides)
    if self.size == "tiny":
      return tiny_config(self.family, **overrides)
    return t5_config(self.size, self.family, **overrides)

  def describe(self) -> dict:
    return {"checkpoint": self.checkpoint, "family": self.family, "size": self.size,
            "overrides": dict(self.overrides), "seed": self.seed}


def frozen_model(checkpoint: Optional[str] = None, family: str = "t5_1_1", size: str = "base",
                 overrides: Optional[dict] = None, seed: int = 0) -> ModelSpec:
  """The frozen model of a run (gin: `train.model = @frozen_model()`).

  With `checkpoint` (t5x `checkpoint_N/` or a Hugging Face directory) the configuration comes
  from the checkpoint and `overrides` adjust it (e.g. dtype='bfloat16'); without one, a randomly
  initialised `family`/`size` model ('tiny' for tests) is used.
  """
  return ModelSpec(checkpoint, family, size, tuple(sorted((overrides or {}).items())), seed)


def load_frozen(spec: ModelSpec, partitioner=None, **config_overrides) -> tuple[T5Config, dict]:
  """(config, params) of the frozen T5, each array placed in its shards on `partitioner`'s mesh
  as it is read (or initialised); without a partitioner, on the default device."""
  overrides = {**dict(spec.overrides), **config_overrides}
  if spec.checkpoint:
    from softprompt_jax.loading import checked_overrides, load_t5, open_checkpoint
    overrides = checked_overrides(overrides)
    place = None
    if partitioner is not None:
      with open_checkpoint(spec.checkpoint) as reader:
        config = reader.config(**overrides)
      place = partitioner.place(partitioner.param_shardings(T5(config)))
    model, params = load_t5(spec.checkpoint, place=place, **overrides)
    return model.config, params
  config = dataclasses.replace(spec.config(), **config_overrides)
  model = T5(config)
  tokens = jnp.ones((1, 8), jnp.int32)
  init = lambda rng: model.init(rng, tokens, tokens)["params"]
  out_shardings = None if partitioner is None else partitioner.param_shardings(model)
  return config, jax.jit(init, out_shardings=out_shardings)(jax.random.PRNGKey(spec.seed))
