"""Reading a prompt: the vocabulary tokens nearest to each prompt vector (the paper's section 7),
and the prompt projected onto them (each vector replaced by its nearest token's embedding), whose
accuracy measures how far a prompt's meaning is from the text it reads as (Khashabi et al. 2021,
"Prompt Waywardness")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# How "nearest" is measured: cosine similarity (the paper's reading), or Euclidean distance
# (the distance wayward prompts are regularized by).
NEAREST_BY = ("cosine", "euclidean")


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_tokens(prompt_PxH, embedding_VxH, k: int = 5, by: str = "cosine"):
  """(ids [P, k], cosine similarities [P, k]) of the k vocabulary embeddings nearest to each
  prompt vector, nearest first: by cosine similarity, or by Euclidean distance (`by`)."""
  if by not in NEAREST_BY:
    raise ValueError(f"nearest_tokens: by={by!r}; use one of {list(NEAREST_BY)}")
  prompt = jnp.asarray(prompt_PxH, jnp.float32)
  table = jnp.asarray(embedding_VxH, jnp.float32)
  cosine_PxV = _unit(prompt) @ _unit(table).T
  if by == "cosine":
    score_PxV = cosine_PxV
  else:  # -|p - e|^2 = 2 p.e - |e|^2 - |p|^2; |p|^2 is the same for every token of a row
    score_PxV = 2 * prompt @ table.T - jnp.sum(jnp.square(table), axis=-1)[None, :]
  order = jnp.argsort(-score_PxV, axis=-1)[:, :k]
  return np.asarray(order), np.asarray(jnp.take_along_axis(cosine_PxV, order, axis=-1))


def project(prompt_PxH, embedding_VxH, by: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
  """(ids [P], projected prompt [P, H]): each prompt vector replaced by the embedding of its
  nearest token (the first of `nearest_tokens`), in the embedding's dtype."""
  ids, _ = nearest_tokens(prompt_PxH, embedding_VxH, k=1, by=by)
  ids_P = ids[:, 0]
  return ids_P, np.asarray(jnp.take(jnp.asarray(embedding_VxH), ids_P, axis=0))


def describe(prompt_PxH, embedding_VxH, vocabulary, k: int = 5,
             by: str = "cosine") -> list[dict]:
  """One row per prompt position: its nearest tokens as text, with their cosine similarities."""
  ids, sims = nearest_tokens(prompt_PxH, embedding_VxH, k, by)
  rows = []
  for position, (row_ids, row_sims) in enumerate(zip(ids, sims)):
    rows.append({"position": position,
                 "tokens": [vocabulary.decode([int(i)]) if vocabulary else int(i) for i in row_ids],
                 "ids": [int(i) for i in row_ids],
                 "cosine": [round(float(s), 4) for s in row_sims]})
  return rows
