"""Prompt variants inside the encoder: a learned prompt at every encoder layer's input, and
prompt attention masks (who may see whom in the encoder).

`@methods.per_layer_prompt(...)`: besides the input prompt [P, H], a prompt per encoder layer,
`layer_prompt/prompt` [L, P, H]. Before layer i (as in the official per_layer.py, from the
first layer on) its row i is combined with the hidden states at the prompt positions:
'replace' overwrites them (so the input prompt itself only shapes nothing past layer 0's input:
it is overwritten there and gets no gradient, as in the official code), 'add' adds to them
(close to Qin & Eisner 2021; zero layer prompts are exactly prompt tuning). The frozen model's
projections then make keys and values of them, unlike prefix tuning's learned keys and values.

`@methods.masked_prompt(prompt_attention=[...])`: prompt tuning with an encoder attention mask
(`prompt_masks` names the kinds); per_layer_prompt takes the same setting. Both record their
settings in the run, so `eval` and `export` rebuild the same model.

`export --out X.npz` writes the learned part as one NumPy archive (`np.load(X)`, no pickle):
`prompt` [P, H] float32, `layer_prompts` [L, P, H] float32 (per-layer only), and the settings
as strings: `method`, `placement`, `prompt_attention` (1-D), `combine` (per-layer only).
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import output_files, prompt_masks
from softprompt_jax.errors import UsageError
from softprompt_jax.methods.base import Method, register_method
from softprompt_jax.prompt_init import random_uniform
from softprompt_jax.prompted_t5 import (PROMPT_PATH, PromptedT5, make_prompted_params,
                                        prompt_index)
from softprompt_jax.t5_layers import param_with_axes

# Where the layer prompts live in a parameter tree (and in the trainable subtree).
LAYER_PROMPT_PATH = ("layer_prompt", "prompt")
# How a layer's prompt rows meet the hidden states at the prompt positions:
# (x_BxTxH, rows_BxTxH, at_prompt_BxTx1) -> x_BxTxH.
COMBINE = {
    "replace": lambda x, rows, at_prompt: jnp.where(at_prompt, rows, x),
    "add": lambda x, rows, at_prompt: x + jnp.where(at_prompt, rows, 0.0),
}
LAYER_INITS = ("zeros", "random_uniform")


def layer_initializer(kind: str, scale: float) -> Callable:
  """init(rng, shape) of the layer prompts: zeros, or uniform in [-scale, scale]."""
  if kind == "zeros":
    return lambda rng, shape: jnp.zeros(shape, jnp.float32)
  uniform = random_uniform(scale)
  return lambda rng, shape: uniform(rng, shape)


class LayerPrompt(nn.Module):
  """The per-layer prompts [L, P, H], called as PromptedT5's `layer_prompt` hook:
  (layer index, x_BxTxH, valid_BxT) -> x_BxTxH with row `layer index` combined at the prompt
  positions of `placement`."""
  num_layers: int
  length: int
  features: int
  combine: str = "add"
  placement: str = "prepend"
  init_fn: Callable = layer_initializer("zeros", 0.5)

  @nn.compact
  def __call__(self, layer_index: int, x_BxTxH: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    shape = (self.num_layers, self.length, self.features)
    init = lambda rng, shape, dtype: self.init_fn(rng, shape)
    prompts_LxPxH = param_with_axes(self, LAYER_PROMPT_PATH[1], init, shape,
                                    ("layers", "prompt", "prompt_embed"))
    index_BxT = prompt_index(self.placement, valid_BxT, self.length)
    rows_BxTxH = jnp.take(prompts_LxPxH[layer_index], jnp.maximum(index_BxT, 0), axis=0)
    at_prompt_BxTx1 = (index_BxT >= 0)[:, :, None]
    return COMBINE[self.combine](x_BxTxH, rows_BxTxH.astype(x_BxTxH.dtype), at_prompt_BxTx1)


# canonical() raises ConfigError (a ValueError), which the rule reads as "refused".
PROMPT_ATTENTION = cc.Rule(f"a list of attention kinds from {list(prompt_masks.ATTENTION_TYPES)}"
                           " (at most one prompt->prompt kind)",
                           lambda value: bool(prompt_masks.canonical(value)))
MASKED_RULES = {"prompt_attention": PROMPT_ATTENTION}
PER_LAYER_RULES = {"combine": cc.one_of(*COMBINE), "layer_init": cc.one_of(*LAYER_INITS),
                   "layer_init_scale": cc.number(0, low_open=True), **MASKED_RULES}


@dataclasses.dataclass(frozen=True)
class MaskedPrompt(Method):
  """Prompt tuning with an encoder attention mask (`prompt_masks` kinds)."""
  name: ClassVar[str] = "masked_prompt"
  prompt_attention: tuple[str, ...] = prompt_masks.FULL

  def __post_init__(self):  # one spelling (gin gives lists, a run's record gives lists)
    object.__setattr__(self, "prompt_attention",
                       prompt_masks.canonical(self.prompt_attention))

  def model(self, config, *, prompt_length: int, prompt_init: Callable,
            num_prompts: Optional[int] = None, placement: str = "prepend") -> nn.Module:
    return PromptedT5(config, prompt_length=prompt_length, prompt_init=prompt_init,
                      num_prompts=num_prompts, placement=placement,
                      prompt_attention=self.prompt_attention)

  def export(self, model_dir, trained: dict, meta: dict, out, *,
             base_model: Optional[str] = None) -> pathlib.Path:
    """The learned part and the settings that use it, as `out` (.npz; see the module doc)."""
    out = pathlib.Path(out)
    if out.suffix != ".npz":
      raise UsageError(f"--out {out}: a {self.name} run exports one .npz archive (the prompt "
                       "and its settings); name the file X.npz")
    if base_model is not None:
      raise UsageError(f"--base_model is for PEFT adapters; a {self.name} run exports a .npz "
                       "(PEFT has no encoder attention masks or per-layer prompts)")
    arrays = {"method": np.array(self.name), "placement": np.array(meta.get("placement",
                                                                            "prepend")),
              "prompt_attention": np.array(self.prompt_attention),
              "prompt": np.asarray(trained[PROMPT_PATH[0]][PROMPT_PATH[1]], np.float32),
              **self._export_arrays(trained)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    output_files.write_bytes(out, buffer.getvalue())
    return out

  def _export_arrays(self, trained: dict) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class PerLayerPrompt(MaskedPrompt):
  """The input prompt plus a prompt at every encoder layer's input (see the module doc)."""
  name: ClassVar[str] = "per_layer_prompt"
  trainable: ClassVar[tuple[str, ...]] = ("/".join(PROMPT_PATH), "/".join(LAYER_PROMPT_PATH))
  combine: str = "add"
  layer_init: str = "zeros"
  layer_init_scale: float = 0.5

  def model(self, config, *, prompt_length: int, prompt_init: Callable,
            num_prompts: Optional[int] = None, placement: str = "prepend") -> nn.Module:
    layer = LayerPrompt(config.num_encoder_layers, prompt_length, config.emb_dim, self.combine,
                        placement, layer_initializer(self.layer_init, self.layer_init_scale))
    return PromptedT5(config, prompt_length=prompt_length, prompt_init=prompt_init,
                      num_prompts=num_prompts, placement=placement, layer_prompt=layer,
                      prompt_attention=self.prompt_attention)

  def init_params(self, net: nn.Module, frozen_params: dict, rng: jax.Array,
                  prompt_values=None) -> dict:
    """The input prompt as prompt tuning makes it (same rng), plus the layer prompts."""
    params = make_prompted_params(net, frozen_params, rng, prompt_values)
    if LAYER_PROMPT_PATH[0] in params:
      raise ValueError("these params already hold layer prompts; pass the frozen T5's params")
    layer = net.layer_prompt
    shape = (layer.num_layers, layer.length, layer.features)
    values = layer.init_fn(jax.random.fold_in(rng, 1), shape)
    return {**params, LAYER_PROMPT_PATH[0]: {LAYER_PROMPT_PATH[1]: values}}

  def _export_arrays(self, trained: dict) -> dict:
    outer, inner = LAYER_PROMPT_PATH
    return {"layer_prompts": np.asarray(trained[outer][inner], np.float32),
            "combine": np.array(self.combine)}


def masked_prompt(prompt_attention=prompt_masks.FULL) -> Method:
  """Prompt tuning whose encoder restricts who sees whom, e.g. ['prompt->prompt;causal'] or
  ['prompt->input'] (the kinds: softprompt_jax.prompt_masks; the inputs always see the inputs
  and the prompt). The default, everything visible, is plain prompt tuning."""
  cc.check("methods.masked_prompt", locals(), MASKED_RULES)
  return MaskedPrompt(prompt_attention=tuple(prompt_attention))


def per_layer_prompt(combine: str = "add", layer_init: str = "zeros",
                     layer_init_scale: float = 0.5,
                     prompt_attention=prompt_masks.FULL) -> Method:
  """A prompt at every encoder layer's input: combine 'add' (to the hidden states at the prompt
  positions) or 'replace' (them); layer prompts start as 'zeros' or 'random_uniform' in
  [-layer_init_scale, layer_init_scale]; `prompt_attention` as in masked_prompt."""
  cc.check("methods.per_layer_prompt", locals(), PER_LAYER_RULES)
  return PerLayerPrompt(prompt_attention=tuple(prompt_attention), combine=combine,
                        layer_init=layer_init, layer_init_scale=float(layer_init_scale))


register_method("masked_prompt", masked_prompt, MASKED_RULES)
register_method("per_layer_prompt", per_layer_prompt, PER_LAYER_RULES)
