"""A method: how a run adapts the frozen T5. It names the module the run applies, the parameters
it adds to the frozen ones and trains, what it adds to the loss, and how its learned part leaves
the run (`export`).

Prompt tuning (the paper) is `PromptTuning`, the default. Another method is one module in this
package: a subclass of `Method` plus `register_method(name, factory, rules)`; gin then knows it
as `train.method = @methods.<name>()`, and a run records `describe()` so that `eval`, `export`
and `interpret` rebuild the same method from the run directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax

from softprompt_jax import optim
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params


@dataclasses.dataclass(frozen=True)
class Method:
  """Prompt tuning: a [P, H] prompt before the embedded input (`PromptedT5`), trained alone.

  Subclasses are frozen dataclasses whose fields are their gin-bound settings (JSON values, so
  `describe()` round-trips through a run's metadata)."""
  name: ClassVar[str] = "prompt_tuning"
  # What it trains unless `train.trainable` says otherwise (t5x-style path regexes).
  trainable: ClassVar[tuple[str, ...]] = optim.PROMPT_ONLY
  # Whether the run's prompt (prompt_length, prompt_init, prompt.npy) belongs to this method.
  has_prompt: ClassVar[bool] = True
  # Whether it trains on a mixture (train.task a list; `model` gets num_prompts = its size).
  mixes_tasks: ClassVar[bool] = False

  def model(self, config, *, prompt_length: int, prompt_init: Callable,
            num_prompts: Optional[int] = None, placement: str = "prepend") -> nn.Module:
    """The flax module the run applies: (params, encoder tokens, decoder tokens) -> logits."""
    return PromptedT5(config, prompt_length=prompt_length, prompt_init=prompt_init,
                      num_prompts=num_prompts, placement=placement)

  def init_params(self, net: nn.Module, frozen_params: dict, rng: jax.Array,
                  prompt_values=None) -> dict:
    """The frozen params plus this method's new ones, initialised (the prompt from the loaded
    embedding table, or `prompt_values`)."""
    return make_prompted_params(net, frozen_params, rng, prompt_values)

  def regularizer(self, trainable: dict, frozen: dict) -> Optional[tuple[Any, dict]]:
    """An extra loss term of the parameters, added to the task loss: (scalar, metrics to log),
    or None. Traced inside the train step."""
    return None

  def export(self, model_dir, trained: dict, meta: dict, out, *,
             base_model: Optional[str] = None):
    """Writes the learned part of a run of this method to `out` (a file or an adapter
    directory; its own format) and returns the path. Prompt tuning's export (a .npy or a PEFT
    prompt-tuning adapter) is `inference.export_prompt`'s own."""
    raise NotImplementedError(f"method {self.name} has no export")

  def describe(self) -> dict:
    """What rebuilds this method: {'name': ..., its fields}."""
    return {"name": self.name, **dataclasses.asdict(self)}


PromptTuning = Method


@dataclasses.dataclass(frozen=True)
class Registered:
  factory: Callable[..., Method]
  rules: dict  # {parameter: config_checks.Rule}, checked when gin calls the factory


# gin: `@methods.<name>()`; gin_setup registers each one.
METHODS: dict[str, Registered] = {}


def register_method(name: str, factory: Callable[..., Method], rules: dict) -> None:
  METHODS[name] = Registered(factory, rules)


def prompt_tuning() -> Method:
  """The paper's method (the default)."""
  return PromptTuning()


register_method("prompt_tuning", prompt_tuning, {})


def is_prompt_only(method: Method) -> bool:
  """Whether a method's learned part is its prompt alone, used as prompt tuning's is (a
  prompt.npy, a PEFT prompt adapter, a bank entry): it has a prompt and no export of its own."""
  return method.has_prompt and type(method).export is Method.export


def from_description(description: Optional[dict]) -> Method:
  """The method a run recorded (`describe()`); runs from before methods existed were prompt
  tuning."""
  if not description:
    return PromptTuning()
  settings = dict(description)
  name = settings.pop("name")
  if name not in METHODS:
    raise ValueError(f"method {name!r} is not known here (known: {sorted(METHODS)}); was the "
                     "run trained by a newer softprompt_jax?")
  return METHODS[name].factory(**settings)
