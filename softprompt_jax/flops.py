"""Matmul FLOPs of T5 forward passes and train steps, counted from the shapes.

Model FLOP utilisation divides these by a step's time and the machine's matmul throughput. Only
matrix multiplications count (2 FLOPs per multiply-add), as in the usual MFU convention: norms,
softmax and activations are a few percent at real sizes. A train step costs the forward pass,
plus the gradient of every matmul with respect to its activation input (needed to reach the
prompt at the very bottom of the encoder), plus, in model tuning only, the gradient with respect
to every weight. Prompt tuning therefore needs about 2/3 of model tuning's work.
"""

from __future__ import annotations

import dataclasses

from softprompt_jax.t5_config import T5Config


@dataclasses.dataclass(frozen=True)
class StepFlops:
  forward: float
  weight_matmuls: float  # the forward FLOPs of matmuls against weights (their dW costs as much)

  @property
  def prompt_tuning(self) -> float:
    """Forward + activation gradients (the prompt's own gradient is a sum, not a matmul)."""
    return 2 * self.forward

  @property
  def model_tuning(self) -> float:
    """Forward + activation gradients + weight gradients."""
    return 2 * self.forward + self.weight_matmuls


def forward_flops(config: T5Config, batch: int, encoder_length: int,
                  decoder_length: int) -> StepFlops:
  """Teacher-forced forward FLOPs; `encoder_length` includes the prompt (P + T)."""
  h, inner, mlp = config.emb_dim, config.num_heads * config.head_dim, config.mlp_dim
  t, s = encoder_length, decoder_length
  mlp_per_token = 2 * h * mlp * (len(config.mlp_activations) + 1)
  projections = 4 * 2 * h * inner  # query, key, value, out
  enc_weights = config.num_encoder_layers * t * (projections + mlp_per_token)
  enc_scores = config.num_encoder_layers * t * 2 * 2 * t * inner  # q.k and weights.v
  dec_weights = config.num_decoder_layers * (
      s * (projections + mlp_per_token)        # self-attention and MLP
      + s * 2 * 2 * h * inner                  # cross-attention query and out
      + t * 2 * 2 * h * inner)                 # cross-attention key and value of the encoder
  dec_scores = config.num_decoder_layers * s * 2 * 2 * (s + t) * inner
  logits = s * 2 * h * config.vocab_size
  weight_matmuls = batch * (enc_weights + dec_weights + logits)
  forward = weight_matmuls + batch * (enc_scores + dec_scores)
  return StepFlops(forward=float(forward), weight_matmuls=float(weight_matmuls))

