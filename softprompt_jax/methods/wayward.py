"""Wayward prompts (Khashabi et al. 2021, "Prompt Waywardness"): prompt tuning whose loss also
pulls the prompt towards the embeddings of a discrete text.

`@methods.wayward(text=..., gamma=0.01, vocabulary=%VOCABULARY)` trains the paper's prompt with

  loss = task loss + gamma * sum_{i,h} (prompt[i, h] - target[i, h])^2 / P

where target[i] is the frozen embedding of the text's i-th token (the text tokenized by the run's
vocabulary, no EOS) and zeros after the text's last token; a text longer than the prompt is
refused. This is the official prompt-tuning code's `squared_l2_distance` (summed over positions
and width, divided by the prompt length) with its default gamma; the official config sets the
prompt length to the text's token count and initializes the prompt from the text
(`configs/runs/wayward.gin` does the same with `@prompts.from_text`). The distance is logged as
`wayward_distance` (before gamma).

The module and the parameters are prompt tuning's, so a wayward run is evaluated, read
(`interpret`: nearest tokens, and the accuracy of the prompt projected onto them) and exported
(`.npy` or a PEFT adapter) as a prompt-tuning run is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import optim
from softprompt_jax.errors import ConfigError
from softprompt_jax.methods.base import Method, register_method
from softprompt_jax.prompt_init import PromptShapeError
from softprompt_jax.prompted_t5 import get_prompt
from softprompt_jax.tokenizers import get_vocabulary

DISTANCE_METRIC = "wayward_distance"  # the train metric: the distance before gamma

RULES = {"text": cc.text(), "gamma": cc.number(0),
         "vocabulary": cc.text(optional=True)}


def squared_l2_distance(prompt_PxH: jax.Array, target_PxH: jax.Array) -> jax.Array:
  """Squared L2 distance summed over positions and width, divided by the prompt length P."""
  return jnp.sum(jnp.square(prompt_PxH - target_PxH)) / prompt_PxH.shape[-2]


def discrete_target(embedding_VxH: jax.Array, token_ids: tuple[int, ...],
                    prompt_length: int) -> jax.Array:
  """[P, H] float32: the embeddings of `token_ids` in the first positions, zeros after."""
  embedded_KxH = jnp.take(embedding_VxH, jnp.asarray(token_ids, jnp.int32), axis=0)
  padding = ((0, prompt_length - len(token_ids)), (0, 0))
  return jnp.pad(embedded_KxH.astype(jnp.float32), padding)


@dataclasses.dataclass(frozen=True)
class WaywardPrompt(Method):
  """Prompt tuning plus gamma times the prompt's squared L2 distance (per position) to the
  embedded `text` (tokenized with `vocabulary`, a VOCABULARY spec: 'byte', a .model file, a
  model directory)."""
  name: ClassVar[str] = "wayward"
  text: str
  gamma: float = 0.01
  vocabulary: Optional[str] = None

  @functools.cached_property
  def token_ids(self) -> tuple[int, ...]:
    """The text's token ids (no EOS); read when the run is set up, not when the method is
    rebuilt to export a run (which needs no vocabulary)."""
    if self.vocabulary is None:
      raise ConfigError("methods.wayward.vocabulary is not set; bind it to the run's "
                        "vocabulary (methods.wayward.vocabulary = %VOCABULARY)")
    try:
      ids = tuple(int(i) for i in get_vocabulary(self.vocabulary).encode(self.text))
    except ValueError as e:  # an unknown vocabulary name, text that is not Unicode
      raise ConfigError(f"methods.wayward: {e}") from None
    if not ids:
      raise ConfigError(f"methods.wayward.text {self.text!r} encodes to no tokens")
    return ids

  def model(self, config, *, prompt_length: int, prompt_init, num_prompts=None,
            placement: str = "prepend"):
    """Prompt tuning's module, once the text is known to fit (before any weight is read)."""
    if num_prompts is not None:
      raise ConfigError("methods.wayward trains one prompt, not a bank of prompts")
    ids = self.token_ids
    if len(ids) > prompt_length:
      raise PromptShapeError(f"methods.wayward: the text has {len(ids)} tokens but the prompt "
                             f"length is {prompt_length}; set train.prompt_length = {len(ids)} "
                             "(as the official config does) or shorten the text")
    too_big = [i for i in ids if i >= config.vocab_size]
    if too_big:
      raise ConfigError(f"methods.wayward: token ids {too_big[:3]} are outside the model's "
                        f"embedding ({config.vocab_size} rows); use the model's vocabulary")
    return super().model(config, prompt_length=prompt_length, prompt_init=prompt_init,
                         num_prompts=num_prompts, placement=placement)

  def regularizer(self, trainable: dict, frozen: dict):
    """(gamma * distance, {wayward_distance: distance}); the target is the frozen embedding,
    held constant even when the embedding itself trains."""
    params = optim.merge(trainable, frozen)
    prompt_PxH = get_prompt(params).astype(jnp.float32)
    target_PxH = jax.lax.stop_gradient(discrete_target(
        params["token_embedder"]["embedding"], self.token_ids, prompt_PxH.shape[-2]))
    distance = squared_l2_distance(prompt_PxH, target_PxH)
    return self.gamma * distance, {DISTANCE_METRIC: distance}

  def target(self, embedding_VxH, prompt_length: int) -> np.ndarray:
    """The discrete prompt the regularizer pulls towards, [P, H] float32 (for reports, tests)."""
    return np.asarray(discrete_target(jnp.asarray(embedding_VxH), self.token_ids, prompt_length))


def wayward(text: str, gamma: float = 0.01, vocabulary: Optional[str] = None) -> Method:
  """Wayward prompts: prompt tuning regularized towards the embedded `text` (see the module)."""
  cc.check("methods.wayward", locals(), RULES)
  return WaywardPrompt(text=text, gamma=float(gamma), vocabulary=vocabulary)


register_method("wayward", wayward, RULES)
