"""Who may attend to whom in the prompted encoder: prompt-aware self-attention masks.

The visibility kinds are named as in the official code (prompt_tuning/extended/masks.py), each
"query->key":

  input->input           the inputs see each other (always on)
  input->prompt          the inputs see the prompt (always on: it is how the prompt steers them)
  prompt->input          the prompt sees the inputs (the prompt is contextualised per example)
  prompt->prompt         the prompt positions see each other
  prompt->prompt;causal  a prompt position sees itself and the earlier prompt positions only

With neither prompt->prompt kind a prompt position sees only itself (and the inputs, with
prompt->input). Padding sees nothing and is seen by nothing, as without a mask. Everything
visible (`FULL`) is the paper's encoder, which needs no mask at all.
"""

from __future__ import annotations

from typing import Sequence

import jax

from softprompt_jax.errors import ConfigError

INPUT_INPUT = "input->input"
INPUT_PROMPT = "input->prompt"
PROMPT_INPUT = "prompt->input"
PROMPT_PROMPT = "prompt->prompt"
PROMPT_PROMPT_CAUSAL = "prompt->prompt;causal"
ATTENTION_TYPES = (INPUT_INPUT, INPUT_PROMPT, PROMPT_INPUT, PROMPT_PROMPT, PROMPT_PROMPT_CAUSAL)
ALWAYS = (INPUT_INPUT, INPUT_PROMPT)
FULL = (INPUT_INPUT, INPUT_PROMPT, PROMPT_INPUT, PROMPT_PROMPT)


def canonical(prompt_attention: Sequence[str]) -> tuple[str, ...]:
  """The visibility kinds as a tuple in `ATTENTION_TYPES` order, with the always-on ones added
  (as the official code does); a ConfigError for an unknown kind, a bare string, or both
  prompt->prompt kinds (which one was meant cannot be told)."""
  if isinstance(prompt_attention, str) or not isinstance(prompt_attention, (list, tuple)):
    raise ConfigError(f"prompt_attention={prompt_attention!r}: give a list of attention kinds "
                      f"from {list(ATTENTION_TYPES)}, e.g. {[PROMPT_PROMPT]}")
  unknown = [kind for kind in prompt_attention if kind not in ATTENTION_TYPES]
  if unknown:
    raise ConfigError(f"prompt_attention: unknown kind(s) {unknown}; the kinds are "
                      f"{list(ATTENTION_TYPES)}")
  if PROMPT_PROMPT in prompt_attention and PROMPT_PROMPT_CAUSAL in prompt_attention:
    raise ConfigError(f"prompt_attention: {PROMPT_PROMPT!r} and {PROMPT_PROMPT_CAUSAL!r} "
                      "exclude each other; keep one")
  chosen = set(prompt_attention) | set(ALWAYS)
  return tuple(kind for kind in ATTENTION_TYPES if kind in chosen)


def is_full(prompt_attention: Sequence[str]) -> bool:
  """Whether everything sees everything (the unmasked encoder)."""
  return set(canonical(prompt_attention)) == set(FULL)


def encoder_mask(prompt_index_BxT: jax.Array, valid_BxT: jax.Array,
                 prompt_attention: Sequence[str]) -> jax.Array:
  """[B, T, T] bool: whether query position q may attend to key position k.

  `prompt_index_BxT`: the prompt row held at each position (0..P-1), -1 at the inputs and
  padding; `valid_BxT`: real positions (prompt and input tokens)."""
  kinds = canonical(prompt_attention)
  at_prompt = prompt_index_BxT >= 0
  at_input = valid_BxT & ~at_prompt
  q_prompt, k_prompt = at_prompt[:, :, None], at_prompt[:, None, :]
  q_input, k_input = at_input[:, :, None], at_input[:, None, :]
  mask_BxTxT = q_input & (k_input | k_prompt)  # input->input, input->prompt
  if PROMPT_INPUT in kinds:
    mask_BxTxT = mask_BxTxT | (q_prompt & k_input)
  q_row, k_row = prompt_index_BxT[:, :, None], prompt_index_BxT[:, None, :]
  if PROMPT_PROMPT in kinds:
    within_BxTxT = q_prompt & k_prompt
  elif PROMPT_PROMPT_CAUSAL in kinds:
    within_BxTxT = q_prompt & k_prompt & (k_row <= q_row)
  else:  # only itself
    within_BxTxT = q_prompt & k_prompt & (k_row == q_row)
  return mask_BxTxT | within_BxTxT

