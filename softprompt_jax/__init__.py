"""softprompt_jax: prompt tuning for a frozen T5 in JAX/Flax, compatible with t5x."""

from importlib import metadata as _metadata

from softprompt_jax.data import get_task
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.t5 import T5, init_params, logical_axes
from softprompt_jax.t5_config import SIZES, T5Config, t5_config, tiny_config

# pyproject.toml's [project] version, for a checkout used without being installed
# (tests/test_package.py keeps the two equal).
_SOURCE_VERSION = "0.1.0"
try:
  __version__ = _metadata.version("softprompt_jax")
except _metadata.PackageNotFoundError:
  __version__ = _SOURCE_VERSION

__all__ = ["PromptedT5", "SIZES", "T5", "T5Config", "__version__", "get_task", "init_params",
           "load_t5", "logical_axes", "make_prompted_params", "t5_config", "tiny_config"]
