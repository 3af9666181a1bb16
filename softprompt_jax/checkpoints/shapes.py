"""T5Config from the shapes of a checkpoint's arrays, for formats that store no configuration.

t5x checkpoints hold parameters only; every architectural size except the relative-attention
maximum distance shows in some array's shape.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError, ParamPath
from softprompt_jax.t5_config import T5Config

# Published gated T5s (1.1, LM-adapted, mT5, ByT5) all gate a GELU; T5 1.0's MLP is a plain ReLU.
GATED_ACTIVATIONS = ("gelu", "linear")
PLAIN_ACTIVATIONS = ("relu",)


def infer_t5_config(shapes: Mapping[ParamPath, Sequence[int]],
                    overrides: Optional[Mapping[str, Any]] = None, *,
                    location: str = "the checkpoint") -> T5Config:
  """T5Config whose parameters have `shapes` ({t5x path tuple: shape}), then `overrides`.

  Inferred: vocab_size and emb_dim (token_embedder/embedding [V, H]); num_encoder_layers and
  num_decoder_layers (highest layers_i + 1); num_heads and relative_attention_num_buckets
  (relpos_bias/rel_embedding [N, buckets]); head_dim (query kernel [H, N*D] / N); mlp_dim and
  mlp_activations (wi_0 + wi_1: gated GELU; wi: ReLU); logits_via_embedding (True when there is
  no decoder/logits_dense). Anything else (relative_attention_max_distance, dropout_rate,
  layer_norm_epsilon, dtype) keeps T5Config's default unless overridden. A field given in
  `overrides` is not inferred, so a checkpoint missing the array it needs still loads.
  """
  overrides = dict(overrides or {})
  shapes = {tuple(p): tuple(s) for p, s in shapes.items()}

  def shape_of(candidates: Sequence[str], field: str) -> tuple[int, ...]:
    for name in candidates:
      if tuple(name.split("/")) in shapes:
        return shapes[tuple(name.split("/"))]
    raise CheckpointError(
        f"cannot infer {field} from {location}: it has none of {list(candidates)}; "
        f"pass {field}=... to load_t5")

  fields: dict[str, Any] = {}
  if not {"vocab_size", "emb_dim"} <= overrides.keys():
    fields["vocab_size"], fields["emb_dim"] = shape_of(["token_embedder/embedding"],
                                                       "vocab_size and emb_dim")
  for stack in ("encoder", "decoder"):
    field = f"num_{stack}_layers"
    if field not in overrides:
      fields[field] = _num_layers(shapes, stack, location)
  if not {"num_heads", "relative_attention_num_buckets"} <= overrides.keys():
    fields["num_heads"], fields["relative_attention_num_buckets"] = shape_of(
        ["encoder/relpos_bias/rel_embedding", "decoder/relpos_bias/rel_embedding"],
        "num_heads and relative_attention_num_buckets")
  if "head_dim" not in overrides:
    num_heads = overrides.get("num_heads", fields.get("num_heads"))
    joined_kv = shape_of(["encoder/layers_0/attention/query/kernel",
                          "decoder/layers_0/self_attention/query/kernel"], "head_dim")[1]
    if joined_kv % num_heads:
      raise CheckpointError(f"{location}: query width {joined_kv} is not a multiple of "
                            f"num_heads={num_heads}; pass num_heads=... and head_dim=...")
    fields["head_dim"] = joined_kv // num_heads
  if not {"mlp_dim", "mlp_activations"} <= overrides.keys():
    activations, mlp_dim = _mlp(shapes, location)
    fields["mlp_activations"], fields["mlp_dim"] = activations, mlp_dim
  if "logits_via_embedding" not in overrides:
    fields["logits_via_embedding"] = ("decoder", "logits_dense", "kernel") not in shapes
  fields.update(overrides)
  return T5Config(**fields)


def _num_layers(shapes, stack: str, location: str) -> int:
  indices = [int(m.group(1)) for p in shapes if len(p) > 1 and p[0] == stack
             for m in [re.fullmatch(r"layers_(\d+)", p[1])] if m]
  if not indices:
    raise CheckpointError(f"cannot infer num_{stack}_layers from {location}: no {stack}/layers_i "
                          f"arrays; pass num_{stack}_layers=... to load_t5")
  # Gaps are left for validation to report as missing arrays.
  return max(indices) + 1


def _mlp(shapes, location: str) -> tuple[tuple[str, ...], int]:
  """(activations, mlp_dim) from the first layer's MLP input kernels."""
  for prefix in (("encoder", "layers_0", "mlp"), ("decoder", "layers_0", "mlp")):
    if prefix + ("wi_0", "kernel") in shapes:
      return GATED_ACTIVATIONS, shapes[prefix + ("wi_0", "kernel")][1]
    if prefix + ("wi", "kernel") in shapes:
      return PLAIN_ACTIVATIONS, shapes[prefix + ("wi", "kernel")][1]
  raise CheckpointError(f"cannot infer mlp_dim and mlp_activations from {location}: no "
                        "layers_0/mlp/wi or wi_0 kernel; pass mlp_dim=... and "
                        "mlp_activations=... to load_t5")
