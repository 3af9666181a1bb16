"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale the keys and values of every
attention (encoder self-attention, decoder self- and cross-attention) and the feed-forward
activations (what each MLP's output projection `wo` reads), initialised to ones; the T5 stays
frozen and no soft prompt is added.

Where the vectors multiply is PEFT's IA3 for T5 (its default target modules k, v and wo, wo a
feed-forward module whose input is scaled) and the official prompt-tuning code's
(extended/train/ia3.py: keys and values per [heads, kv], the MLP activations per mlp unit). They
are params beside the frozen ones, `ia3_key` / `ia3_value` [N, D] (axes heads, kv) under each
attention and `ia3_mlp` [F] (axis mlp) under each MLP, e.g.
`decoder/layers_0/encoder_decoder_attention/ia3_key`. They apply at t5_layers' hooks
(`MultiHeadAttention.adapt_kv`, `MLP.adapt_hidden`), which `IA3T5` intercepts (flax's
`nn.intercept_methods`): t5.py is untouched and every other model's params and numerics stay
exactly as they were.

A run: `train.method = @methods.ia3()` with `train.prompt_length = 0` (configs/runs/ia3.gin);
`methods.ia3.init_from = DIR` starts from a PEFT IA3 adapter; `export` writes one.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from softprompt_jax import config_checks as cc
from softprompt_jax import optim, output_files
from softprompt_jax.checkpoints import peft_ia3
from softprompt_jax.errors import ConfigError, UsageError
from softprompt_jax.methods.base import Method, register_method
from softprompt_jax.paths import local_path
from softprompt_jax.peft_interop import adapter_base_model
from softprompt_jax.t5 import T5
from softprompt_jax.t5_config import T5Config
from softprompt_jax.t5_layers import MLP, MultiHeadAttention, param_with_axes

# Which params an IA3 run trains (t5x-style path regexes, fully matched).
IA3_ONLY = (f".*/({peft_ia3.KEY}|{peft_ia3.VALUE}|{peft_ia3.MLP})",)


def _rescale(next_fun: Callable, args, kwargs, context) -> Any:
  """flax method interceptor: multiplies what the t5_layers hooks return by IA3 vectors, made
  as params of the hooked module (so they sit beside its projections)."""
  module = context.module
  if context.method_name == "adapt_kv" and isinstance(module, MultiHeadAttention):
    k_BxNxKxD, v_BxNxKxD = next_fun(*args, **kwargs)
    shape, axes = (module.num_heads, module.head_dim), ("heads", "kv")
    key_NxD = param_with_axes(module, peft_ia3.KEY, nn.initializers.ones, shape, axes)
    value_NxD = param_with_axes(module, peft_ia3.VALUE, nn.initializers.ones, shape, axes)
    return (k_BxNxKxD * key_NxD[None, :, None, :].astype(k_BxNxKxD.dtype),
            v_BxNxKxD * value_NxD[None, :, None, :].astype(v_BxNxKxD.dtype))
  if context.method_name == "adapt_hidden" and isinstance(module, MLP):
    hidden_BxLxF = next_fun(*args, **kwargs)
    mlp_F = param_with_axes(module, peft_ia3.MLP, nn.initializers.ones, (module.mlp_dim,),
                            ("mlp",))
    return hidden_BxLxF * mlp_F.astype(hidden_BxLxF.dtype)
  return next_fun(*args, **kwargs)


class IA3T5(T5):
  """T5 with IA3 vectors; same calls and outputs as `T5` (decoding's `encode` / `decode`
  included: the cross-attention cache keeps keys and values already rescaled)."""

  def encode(self, *args, **kwargs):
    with nn.intercept_methods(_rescale):
      return super().encode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    with nn.intercept_methods(_rescale):
      return super().decode(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """IA3 on the frozen T5. `init_from`: a PEFT IA3 adapter directory whose vectors start the
  run (else ones)."""
  name: ClassVar[str] = "ia3"
  trainable: ClassVar[tuple[str, ...]] = IA3_ONLY
  has_prompt: ClassVar[bool] = False
  init_from: Optional[str] = None

  def model(self, config, *, prompt_length: int, prompt_init: Optional[Callable],
            num_prompts: Optional[int] = None, placement: str = "prepend") -> nn.Module:
    # A prompt length would be silently unused; a run that asks for one is told.
    if prompt_length:
      raise ConfigError(f"methods.ia3 trains no soft prompt, but train.prompt_length is "
                        f"{prompt_length}; set train.prompt_length = 0 (runs/ia3.gin does)")
    if self.init_from is not None:  # read now: a wrong adapter fails before the weights load
      self._adapter_vectors(config)
    return IA3T5(config)

  def init_params(self, net: nn.Module, frozen_params: dict, rng: jax.Array,
                  prompt_values=None) -> dict:
    """The frozen params plus every IA3 vector: ones, or `init_from`'s."""
    del rng  # ones (or the adapter's values): nothing random
    if prompt_values is not None:
      raise ValueError("methods.ia3 takes no prompt values")
    if any(re.fullmatch(IA3_ONLY[0], path) for path in flatten_dict(frozen_params, sep="/")):
      raise ValueError("these params already hold IA3 vectors; pass the frozen T5's params")
    vectors = (peft_ia3.ones_vectors(net.config) if self.init_from is None
               else self._adapter_vectors(net.config))
    return optim.merge(jax.tree_util.tree_map(jnp.asarray, vectors), frozen_params)

  def _adapter_vectors(self, config: T5Config) -> dict:
    return peft_ia3.load_ia3_adapter(local_path(self.init_from, "methods.ia3.init_from"),
                                     config)

  def export(self, model_dir, trained: dict, meta: dict, out, *,
             base_model: Optional[str] = None):
    """The run's IA3 vectors as a PEFT IA3 adapter directory (`PeftModel.from_pretrained`
    loads it); its base model is `base_model`, else the run's Hugging Face checkpoint."""
    if out.suffix == ".npy" or output_files.is_stream(out):
      raise UsageError(f"--out {out}: an IA3 run exports a PEFT adapter directory, not a "
                       "prompt file; give a directory")
    config = T5Config.from_dict(meta["config"])
    base = adapter_base_model(base_model, (meta.get("model") or {}).get("checkpoint"),
                                       config.emb_dim)
    adapter = peft_ia3.save_ia3_adapter(out, trained, config, base_model_name_or_path=base)
    if base is None:
      print(f"note: {adapter / peft_ia3.ADAPTER_CONFIG} has base_model_name_or_path null (the "
            "run's frozen model is not a Hugging Face directory here); export again with "
            "--base_model NAME, or load it with PeftModel.from_pretrained(model, adapter)",
            file=sys.stderr, flush=True)
    return adapter

  def describe(self) -> dict:
    # `init_from` only starts a run (the run's config.gin records it); what rebuilds a trained
    # run is its trained vectors, so eval and export never need that directory again.
    return {"name": self.name}


def ia3(init_from: Optional[str] = None) -> Method:
  """IA3: rescaling vectors on keys, values and feed-forward activations (train.prompt_length
  = 0). `init_from`: a PEFT IA3 adapter directory to start from."""
  return IA3(init_from=init_from)


register_method("ia3", ia3, {"init_from": cc.path(optional=True)})
