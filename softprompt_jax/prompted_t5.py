"""PromptedT5: the frozen T5 with a learnable soft prompt spliced into its embedded input.

The parameter tree is T5's exactly, plus `prompt/prompt` ([P, H], or [N, P, H] for a bank of N
task prompts), so a T5 checkpoint drops in unchanged. The prompt module only returns the prompt;
splicing it into the inputs is a separate function (`prepend` / `append`), as in the paper's code.
Two options reach past the input: `layer_prompt`, a module that rewrites the prompt positions
before every encoder layer, and `prompt_attention`, who may see whom in the encoder
(`prompt_masks`; the default, everything visible, is the paper's encoder).
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax import prompt_masks
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


def prompt_index(placement: str, valid_BxT: jax.Array, prompt_length: int) -> jax.Array:
  """[B, T] int32: the prompt row (0..P-1) at each position of a placed sequence, -1 elsewhere.
  `valid_BxT` is the placed sequence's mask (prompt included), as the encoder sees it."""
  b, t = valid_BxT.shape
  j_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
  if placement == "prepend":
    row_BxT = j_BxT
  elif placement == "append":  # the prompt is the last P real positions
    row_BxT = j_BxT - (jnp.sum(valid_BxT, axis=1, dtype=jnp.int32)[:, None] - prompt_length)
  else:
    raise ValueError(f"prompt_index: placement {placement!r} is not known here; add it beside "
                     "the placement in PLACEMENTS")
  return jnp.where((row_BxT >= 0) & (row_BxT < prompt_length), row_BxT, -1)


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
  # `layer_prompt/`. The prompt positions are the first P valid ones (prepend) or the last P
  # (`prompt_index` gives them).
  layer_prompt: Optional[nn.Module] = None
  # Who may see whom in the encoder (`prompt_masks` kinds); everything by default, which builds
  # no mask at all (T5's own path).
  prompt_attention: tuple[str, ...] = prompt_masks.FULL

  def setup(self):
    super().setup()
    if self.placement not in PLACEMENTS:
      raise ValueError(f"PromptedT5.placement: {self.placement!r}; use one of {list(PLACEMENTS)}")
    self.prompt = Prompt(self.prompt_length, self.config.emb_dim, self.num_prompts,
                         self.prompt_init)
    prompt_masks.canonical(self.prompt_attention)  # a bad kind fails here, in one line

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

  def encoder_attention_mask(self, valid_BxT: jax.Array) -> Optional[jax.Array]:
    """The prompt mask over the placed sequence, or None when everything is visible."""
    if prompt_masks.is_full(self.prompt_attention):
      return None
    index_BxT = prompt_index(self.placement, valid_BxT, self.prompt_length)
    return prompt_masks.encoder_mask(index_BxT, valid_BxT, self.prompt_attention)

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
