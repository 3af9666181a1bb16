"""t5x's loss: token cross-entropy plus z-loss, optional label smoothing, explicit normalisation.

Per real target token (target id > 0):
  log_z  = logsumexp(logits)
  xent   = -sum_v q_v * (logits_v - log_z) - H(q)   (q: smoothed one-hot; H(q) makes it 0 at best)
  z_loss = z_loss_coef * log_z ** 2                 (keeps log_z near 0, as t5x; 1e-4)
The per-token losses are summed and divided by the normaliser:
  "num_real_target_tokens" (default): the count of target ids > 0, i.e. a mean per real token —
      the same quantity as Hugging Face's loss when z_loss = 0 and no smoothing;
  "sum": no division (t5x's `loss_normalizing_factor=None`);
  a number: divide by that constant (t5x's pretraining style, e.g. batch * target length).
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

Normalizer = Union[str, float]


def cross_entropy_with_z_loss(logits_BxSxV: jax.Array, targets_BxS: jax.Array, *,
                              z_loss: float = 1e-4,
                              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy [B, S], z-loss [B, S]) per position, before masking."""
  vocab = logits_BxSxV.shape[-1]
  logits = logits_BxSxV.astype(jnp.float32)
  log_z_BxS = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z_BxS[..., None]
  confidence = 1.0 - label_smoothing
  if label_smoothing:
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets_BxS, vocab) * (confidence - low) + low
    xent = -jnp.sum(soft * log_probs, axis=-1)
    # Subtract the entropy of the smoothed targets so a perfect prediction scores 0.
    xent -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  else:
    xent = -jnp.take_along_axis(log_probs, targets_BxS[..., None], axis=-1)[..., 0]
  return xent, z_loss * jnp.square(log_z_BxS)


def normalizer_value(normalizer: Normalizer, weights_BxS: jax.Array) -> jax.Array:
  """The divisor of the summed per-token losses (see the module docstring)."""
  if normalizer == "num_real_target_tokens":
    return jnp.maximum(jnp.sum(weights_BxS), 1.0)
  if normalizer == "sum":
    return jnp.asarray(1.0, jnp.float32)
  if isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool) and normalizer > 0:
    return jnp.asarray(float(normalizer), jnp.float32)
  raise ValueError(f"loss normalizer {normalizer!r}: use 'num_real_target_tokens', 'sum' or a "
                   "positive number")


def t5x_loss(logits_BxSxV: jax.Array, targets_BxS: jax.Array, *, z_loss: float = 1e-4,
             label_smoothing: float = 0.0, normalizer: Normalizer = "num_real_target_tokens"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss and a dict of diagnostics (`cross_entropy`, `z_loss`, `num_tokens`)."""
  weights = (targets_BxS > 0).astype(jnp.float32)
  xent, zl = cross_entropy_with_z_loss(logits_BxSxV, targets_BxS, z_loss=z_loss,
                                       label_smoothing=label_smoothing)
  denom = normalizer_value(normalizer, weights)
  xent_sum, z_sum = jnp.sum(xent * weights), jnp.sum(zl * weights)
  loss = (xent_sum + z_sum) / denom
  return loss, {"cross_entropy": xent_sum / denom, "z_loss": z_sum / denom,
                "num_tokens": jnp.sum(weights)}
