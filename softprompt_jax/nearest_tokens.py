"""Reading a prompt: the vocabulary tokens nearest to each prompt vector (the paper's section 7)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def nearest_tokens(prompt_PxH, embedding_VxH, k: int = 5):
  """(ids [P, k], cosine similarities [P, k]) of the k most similar vocabulary embeddings."""
  prompt = jnp.asarray(prompt_PxH, jnp.float32)
  table = jnp.asarray(embedding_VxH, jnp.float32)
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cosine_PxV = unit(prompt) @ unit(table).T
  order = jnp.argsort(-cosine_PxV, axis=-1)[:, :k]
  return np.asarray(order), np.asarray(jnp.take_along_axis(cosine_PxV, order, axis=-1))


def describe(prompt_PxH, embedding_VxH, vocabulary, k: int = 5) -> list[dict]:
  """One row per prompt position: its nearest tokens as text, with similarities."""
  ids, sims = nearest_tokens(prompt_PxH, embedding_VxH, k)
  rows = []
  for position, (row_ids, row_sims) in enumerate(zip(ids, sims)):
    rows.append({"position": position,
                 "tokens": [vocabulary.decode([int(i)]) if vocabulary else int(i) for i in row_ids],
                 "ids": [int(i) for i in row_ids],
                 "cosine": [round(float(s), 4) for s in row_sims]})
  return rows
