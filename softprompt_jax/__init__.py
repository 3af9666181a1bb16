"""softprompt_jax: prompt tuning for a frozen T5 in JAX/Flax, compatible with t5x."""

from softprompt_jax.t5_config import SIZES, T5Config, t5_config, tiny_config
from softprompt_jax.t5 import T5, init_params, logical_axes

__all__ = ["SIZES", "T5", "T5Config", "init_params", "logical_axes", "t5_config", "tiny_config"]
