"""Prompt ensembling (the paper's section 6): one input, k prompts of a bank, majority vote.

All k prompts run in one batch of B * k rows (the bank's per-example prompt ids), so an ensemble
costs one call of the frozen model, not k.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from softprompt_jax import decoding


def majority_vote(predictions_KxB: Sequence[Sequence]) -> list:
  """Most common prediction per example; ties go to the earliest prompt's prediction."""
  by_example = list(zip(*predictions_KxB))
  voted = []
  for votes in by_example:
    keys = [tuple(np.asarray(v).ravel().tolist()) if np.ndim(v) else v for v in votes]
    counts = collections.Counter(keys)
    best = max(counts.values())
    winner = next(i for i, key in enumerate(keys) if counts[key] == best)
    voted.append(votes[winner])
  return voted


def _tile(encoder_input_tokens_BxT, prompt_ids_K):
  tokens = jnp.asarray(encoder_input_tokens_BxT)
  ids = jnp.asarray(prompt_ids_K, jnp.int32)
  batch, k = tokens.shape[0], ids.shape[0]
  # Row r = k-major: rows [j*B, (j+1)*B) use prompt j, so reshaping gives [K, B, ...].
  return jnp.tile(tokens, (k, 1)), jnp.repeat(ids, batch), batch, k


def ensemble_rank_classify(model, params, encoder_input_tokens_BxT, candidate_target_tokens,
                           prompt_ids_K):
  """(voted class [B], per-prompt classes [K, B]) by rank classification with each prompt."""
  tokens, ids, batch, k = _tile(encoder_input_tokens_BxT, prompt_ids_K)
  candidates = jnp.asarray(candidate_target_tokens)
  if candidates.ndim == 3:
    candidates = jnp.tile(candidates, (k, 1, 1))
  chosen = np.asarray(decoding.rank_classify(model, params, tokens, candidates, prompt_ids=ids))
  per_prompt_KxB = chosen.reshape(k, batch)
  return np.asarray(majority_vote(per_prompt_KxB)), per_prompt_KxB


def ensemble_greedy_decode(model, params, encoder_input_tokens_BxT, prompt_ids_K,
                           max_decode_length: int, eos_id: int = 1):
  """(voted sequences [B, L], per-prompt sequences [K, B, L]) by greedy decoding."""
  tokens, ids, batch, k = _tile(encoder_input_tokens_BxT, prompt_ids_K)
  decoded = np.asarray(decoding.greedy_decode(model, params, tokens, max_decode_length, eos_id,
                                              prompt_ids=ids))
  per_prompt = decoded.reshape(k, batch, -1)
  return np.stack(majority_vote(per_prompt)), per_prompt
