"""Name and layout mapping between Hugging Face T5 state dicts and t5x's parameter tree.

Hugging Face stores torch `Linear` weights as [out, in]; t5x stores kernels as [in, out]. The
relative-position table is [buckets, heads] there and [heads, buckets] here.
"""

from __future__ import annotations

from typing import Any, Mapping

from softprompt_jax.t5_config import T5Config

_HF_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> T5Config:
  """T5Config from a Hugging Face `config.json` dict."""
  proj = hf.get("feed_forward_proj", "relu")
  if proj.startswith("gated-"):
    activations = (proj[len("gated-"):], "linear")
  else:
    activations = (proj,)
  activations = tuple("gelu" if a in ("gelu_new", "gelu_pytorch_tanh") else a for a in activations)
  if activations[0] not in ("gelu", "relu"):
    raise ValueError(f"config.json: feed_forward_proj {proj!r} is not a T5 MLP this library "
                     "implements (use 'relu', 'gated-gelu' or 'gated-gelu_new')")
  fields = dict(
      vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
      num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=activations,
      dropout_rate=hf.get("dropout_rate", 0.1),
      logits_via_embedding=scales_decoder_output(hf),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
  fields.update(overrides)
  return T5Config(**fields)


def scales_decoder_output(hf: Mapping[str, Any]) -> bool:
  """Whether logits come from the embedding scaled by d_model**-0.5 (T5 1.0 style).

  transformers >= 5 writes `scale_decoder_outputs` and always `tie_word_embeddings: true`, even for
  T5 1.1 whose output layer is then a copy of `shared.weight`; older configs say it with
  `tie_word_embeddings: false`.
  """
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def hf_name_map(config: T5Config) -> dict[str, tuple[str, bool]]:
  """{hf_name: (t5x_path, transpose)} for every array a model of `config` needs."""
  names: dict[str, tuple[str, bool]] = {"shared.weight": ("token_embedder/embedding", False)}
  mlp = (["wi"] if len(config.mlp_activations) == 1
         else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]

  def attention(hf_prefix, t5x_prefix):
    for hf_k, t5x_k in _HF_ATTENTION.items():
      names[f"{hf_prefix}.{hf_k}.weight"] = (f"{t5x_prefix}/{t5x_k}/kernel", True)

  def dense_block(hf_prefix, t5x_prefix):
    for m in mlp:
      names[f"{hf_prefix}.DenseReluDense.{m}.weight"] = (f"{t5x_prefix}/mlp/{m}/kernel", True)

  for i in range(config.num_encoder_layers):
    hp, tp = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
    attention(f"{hp}.0.SelfAttention", f"{tp}/attention")
    names[f"{hp}.0.layer_norm.weight"] = (f"{tp}/pre_attention_layer_norm/scale", False)
    dense_block(f"{hp}.1", tp)
    names[f"{hp}.1.layer_norm.weight"] = (f"{tp}/pre_mlp_layer_norm/scale", False)
  for i in range(config.num_decoder_layers):
    hp, tp = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
    attention(f"{hp}.0.SelfAttention", f"{tp}/self_attention")
    names[f"{hp}.0.layer_norm.weight"] = (f"{tp}/pre_self_attention_layer_norm/scale", False)
    attention(f"{hp}.1.EncDecAttention", f"{tp}/encoder_decoder_attention")
    names[f"{hp}.1.layer_norm.weight"] = (f"{tp}/pre_cross_attention_layer_norm/scale", False)
    dense_block(f"{hp}.2", tp)
    names[f"{hp}.2.layer_norm.weight"] = (f"{tp}/pre_mlp_layer_norm/scale", False)
  for stack in ("encoder", "decoder"):
    names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        f"{stack}/relpos_bias/rel_embedding", True)
    names[f"{stack}.final_layer_norm.weight"] = (f"{stack}/{stack}_norm/scale", False)
  if not config.logits_via_embedding:
    names["lm_head.weight"] = ("decoder/logits_dense/kernel", True)
  return names


# The untied output layer is absent from transformers >= 5 files, where it equals `shared.weight`.
HF_LM_HEAD_FALLBACK = "shared.weight"

# Copies of `shared.weight` that Hugging Face may also store; they carry no information.
HF_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def params_from_hf_state(state: Mapping[str, Any], config: T5Config) -> dict:
  """Nested t5x params from an in-memory {hf_name: array} dict (no file I/O, no validation)."""
  from flax.traverse_util import unflatten_dict
  import numpy as np
  flat = {}
  for hf_name, (path, transpose) in hf_name_map(config).items():
    if hf_name not in state and hf_name == "lm_head.weight":
      hf_name = HF_LM_HEAD_FALLBACK
    array = np.asarray(state[hf_name])
    flat[tuple(path.split("/"))] = array.T if transpose else array
  return unflatten_dict(flat)


def hf_state_from_params(params: Mapping[str, Any], config: T5Config) -> dict:
  """{hf_name: numpy array} for a t5x params tree: the inverse of `params_from_hf_state`."""
  from flax.traverse_util import flatten_dict
  import numpy as np
  flat = flatten_dict(params, sep="/")
  state = {}
  for hf_name, (path, transpose) in hf_name_map(config).items():
    array = np.asarray(flat[path], np.float32)
    state[hf_name] = np.ascontiguousarray(array.T if transpose else array)
  return state


def hf_config_dict(config: T5Config) -> dict:
  """A Hugging Face `config.json` dict describing `config` (the inverse of `config_from_hf`)."""
  gated = len(config.mlp_activations) > 1
  act = "gelu_new" if config.mlp_activations[0] == "gelu" else config.mlp_activations[0]
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
      "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": f"gated-{act}" if gated else act, "is_encoder_decoder": True,
      "tie_word_embeddings": config.logits_via_embedding,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
  }
