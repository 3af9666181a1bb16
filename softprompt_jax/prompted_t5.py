"""PromptedT5: the frozen T5 with a learnable soft prompt spliced into its embedded input.

The parameter tree is T5's exactly, plus `prompt/prompt` ([P, H], or [N, P, H] for a bank of N
task prompts), so a T5 checkpoint drops in unchanged. The prompt module only returns the prompt;
splicing it into the inputs is a separate function (`prepend` / `append`), as in the paper's code.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax.prompt_init import from_array, random_uniform
from softprompt_jax.t5 import T5, LayerInputs
from softprompt_jax.t5_layers import param_with_axes


# The prompt as the rest of the code sees it: where it lives in a parameter tree (and in the
# trainable subtree), and its shape alone or as a bank of task prompts.
PROMPT_PATH = ("prompt", "prompt")


def prompt_shape(prompt_length: int, width: int, num_prompts: Optional[int] = None) -> tuple:
  """[P, H] for one prompt, [N, P, H] for a bank of N."""
  return ((prompt_length, width) if num_prompts is None
          else (num_prompts, prompt_length, width))


def get_prompt(params: dict) -> jax.Array:
  """The prompt held in `params` (a full or trainable parameter tree)."""
  outer, inner = PROMPT_PATH
  return params[outer][inner]


def with_prompt(params: dict, prompt) -> dict:
  """`params` with its prompt set to `prompt` (a new outer dict; the rest shared)."""
  outer, inner = PROMPT_PATH
  return {**params, outer: {inner: prompt}}


class Prompt(nn.Module):
  """The learnable prompt matrix; `embedding_VxH` feeds vocabulary-based initializers."""
  length: int
  features: int
  num_prompts: Optional[int] = None
  init_fn: Callable = random_uniform()

  @nn.compact
  def __call__(self, embedding_VxH):
    shape = prompt_shape(self.length, self.features, self.num_prompts)
    axes = ("prompt", "prompt_embed") if self.num_prompts is None else (
        "prompts", "prompt", "prompt_embed")
    init = lambda rng, shape, dtype: self.init_fn(rng, shape, embedding_VxH)
    return param_with_axes(self, "prompt", init, shape, axes)


def prepend(x_BxTxH, valid_BxT, prompt_BxPxH):
  """Prompt first: it takes positions 0..P-1 and is always attended to."""
  b, p = prompt_BxPxH.shape[:2]
  x = jnp.concatenate([prompt_BxPxH.astype(x_BxTxH.dtype), x_BxTxH], axis=1)
  valid = jnp.concatenate([jnp.ones((b, p), bool), valid_BxT], axis=1)
  return x, valid


def append(x_BxTxH, valid_BxT, prompt_BxPxH):
  """Prompt right after each example's last real token (not after its padding).

  Relative positions then put the prompt at the same distance from the text whatever the padding.
  Assumes right-padded inputs, as T5 batches are.
  """
  b, t = valid_BxT.shape
  p = prompt_BxPxH.shape[1]
  lengths_B = jnp.sum(valid_BxT, axis=1)
  joined = jnp.concatenate([x_BxTxH, prompt_BxPxH.astype(x_BxTxH.dtype)], axis=1)
  j = jnp.arange(t + p)[None, :]
  in_text = j < lengths_B[:, None]
  in_prompt = (~in_text) & (j < lengths_B[:, None] + p)
  # Index into `joined`: text tokens, then prompt rows (stored at t..t+p-1), then padding.
  source_BxL = jnp.where(in_text, j, jnp.where(in_prompt, t + j - lengths_B[:, None], j - p))
  x = jnp.take_along_axis(joined, source_BxL[:, :, None], axis=1)
  return x, in_text | in_prompt


# How the prompt joins the embedded input: `placement(x_BxTxH, valid_BxT, prompt_BxPxH) ->
# (x_Bx(T+P)xH, valid_Bx(T+P))`. A new placement is one function and one entry here.
PLACEMENTS = {"prepend": prepend, "append": append}


class PromptedT5(T5):
  """T5 with a soft prompt. `apply(params, encoder_input_tokens, decoder_input_tokens)` -> logits.

  With `num_prompts=N` the prompt is a bank [N, P, H] and each call takes `prompt_ids` [B]: one
  frozen model serves many tasks in one batch.
  """
  prompt_length: int = 100
  prompt_init: Callable = random_uniform()
  num_prompts: Optional[int] = None
  placement: str = "prepend"
  # A per-layer prompt, if any: a linen module called as the encoder's `layer_inputs` hook,
  # (layer index, x_BxTxH, valid_BxT) -> x_BxTxH (see t5.Encoder); its params live under
  # `layer_prompt/`. The prompt positions are the first P valid ones (prepend) or the last P.
  layer_prompt: Optional[nn.Module] = None

  def setup(self):
    super().setup()
    if self.placement not in PLACEMENTS:
      raise ValueError(f"PromptedT5.placement: {self.placement!r}; use one of {list(PLACEMENTS)}")
    self.prompt = Prompt(self.prompt_length, self.config.emb_dim, self.num_prompts,
                         self.prompt_init)

  def encoder_inputs(self, encoder_input_tokens_BxT, prompt_ids=None):
    x_BxTxH = self.token_embedder(encoder_input_tokens_BxT)
    valid_BxT = encoder_input_tokens_BxT > 0
    prompt = self.prompt(self.token_embedder.embedding)
    b = encoder_input_tokens_BxT.shape[0]
    if self.num_prompts is None:
      if prompt_ids is not None:
        raise ValueError("prompt_ids given, but this PromptedT5 has a single prompt; "
                         "set num_prompts to use a prompt bank")
      prompt_BxPxH = jnp.broadcast_to(prompt, (b,) + prompt.shape)
    else:
      if prompt_ids is None:
        raise ValueError(f"this PromptedT5 has a bank of {self.num_prompts} prompts: pass "
                         "prompt_ids [batch] to choose each example's prompt")
      prompt_BxPxH = jnp.take(prompt, jnp.asarray(prompt_ids, jnp.int32), axis=0)
    return PLACEMENTS[self.placement](x_BxTxH, valid_BxT, prompt_BxPxH)

  def encode(self, encoder_input_tokens_BxT: jax.Array, *, enable_dropout: bool = False,
             layer_inputs: Optional[LayerInputs] = None, **kwargs) -> tuple[jax.Array, jax.Array]:
    """T5.encode, with `layer_prompt` as the per-layer hook when there is one."""
    if self.layer_prompt is not None:
      if layer_inputs is not None:
        raise ValueError("this PromptedT5 has a layer_prompt; pass no other layer_inputs")
      layer_inputs = self.layer_prompt
    return super().encode(encoder_input_tokens_BxT, enable_dropout=enable_dropout,
                          layer_inputs=layer_inputs, **kwargs)


def make_prompted_params(model: PromptedT5, t5_params: dict, rng: jax.Array,
                         prompt_values=None) -> dict:
  """T5 params plus a prompt made from the real (loaded) embedding table.

  `prompt_values` ([P, H] or the bank's shape) overrides the module's initializer.
  """
  shape = prompt_shape(model.prompt_length, model.config.emb_dim, model.num_prompts)
  init = model.prompt_init if prompt_values is None else from_array(prompt_values)
  prompt = init(rng, shape, t5_params["token_embedder"]["embedding"])
  if PROMPT_PATH[0] in t5_params:
    raise ValueError("these params already hold a prompt; pass the frozen T5's params")
  return with_prompt(t5_params, jnp.asarray(prompt, jnp.float32))
