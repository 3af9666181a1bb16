"""Methods beyond the paper's prompt tuning, each one module (see base.py for what a method is)."""

from softprompt_jax.methods.base import (METHODS, Method, PromptTuning, from_description,
                                         is_prompt_only, prompt_tuning, register_method)

__all__ = ["METHODS", "Method", "PromptTuning", "from_description", "is_prompt_only",
           "prompt_tuning", "register_method"]
from softprompt_jax.methods import per_layer  # noqa: E402,F401  (per_layer_prompt, masked_prompt)
from softprompt_jax.methods import wayward  # noqa: E402,F401  (registers @methods.wayward)
from softprompt_jax.methods import ia3  # noqa: E402,F401  (registers @methods.ia3)
from softprompt_jax.methods import multi_task  # noqa: E402,F401  (registers @methods.multi_task_prompt)
