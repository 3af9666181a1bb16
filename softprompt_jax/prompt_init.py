"""Soft-prompt initializers that make a prompt from the frozen model's embedding table (or
fixed values): plain functions returning `init(rng, shape, embedding_VxH) -> [P, H]`.

Each factory is a plain function (gin-configurable) that closes over its settings; the returned
initializer gets the frozen model's token-embedding table when the prompt is made, so the
vocabulary-based initializations use the real pretrained embeddings, not random ones. (The ones
that read a prompt from a file, and the registry of them all, are in `prompts`.)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax.errors import UserError

PromptInit = Callable[[jax.Array, tuple, jax.Array], jax.Array]

# Ids below this are pad/eos/unk in T5's vocabularies; never sampled as prompt seeds.
NUM_SPECIAL_IDS = 3


class PromptShapeError(UserError, ValueError):
  """A prompt's shape does not fit the model: both shapes are in the message."""


NUM_TOKENS = cc.integer(1)
# What the initializers' gin-bound parameters accept (labels and vocabulary are passed by the
# run, from the task and the model).
INITIALIZER_RULES = {
    "random_uniform": {"scale": cc.number(0, low_open=True)},
    "sampled_vocab": {"num_tokens": NUM_TOKENS},
    "class_labels": {"labels": cc.anything(), "vocabulary": cc.anything(),
                     "num_tokens": NUM_TOKENS, "label_order": cc.anything()},
    "from_text": {"text": cc.text(), "vocabulary": cc.anything(), "num_tokens": NUM_TOKENS},
}


def random_uniform(scale: float = 0.5) -> PromptInit:
  """Uniform in [-scale, scale], the paper's random init (scale 0.5).

  Note: the official prompt-tuning code's `uniform(0.5)` is flax's uniform initializer, which
  draws from [0, 0.5) — a different, all-positive distribution. This one is symmetric.
  """
  cc.check("prompts.random_uniform", locals(), INITIALIZER_RULES["random_uniform"])

  def init(rng, shape, embedding_VxH=None):
    del embedding_VxH
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)

  return init


def _sample_rows(rng, embedding_VxH, count: int, num_tokens: int):
  vocab = embedding_VxH.shape[0]
  high = min(vocab, NUM_SPECIAL_IDS + num_tokens)
  if high <= NUM_SPECIAL_IDS:
    raise ValueError(f"sampled_vocab: num_tokens={num_tokens} leaves no token to sample from a "
                     f"vocabulary of {vocab}")
  ids = jax.random.randint(rng, (count,), NUM_SPECIAL_IDS, high)
  return jnp.take(embedding_VxH, ids, axis=0).astype(jnp.float32)


def sampled_vocab(num_tokens: int = 5000) -> PromptInit:
  """Each prompt vector is the embedding of a token drawn from the `num_tokens` most frequent.

  SentencePiece orders pieces by score (about frequency), so the most frequent tokens are the
  lowest ids after pad/eos/unk; the paper uses the 5,000 most frequent.
  """
  cc.check("prompts.sampled_vocab", locals(), INITIALIZER_RULES["sampled_vocab"])

  def init(rng, shape, embedding_VxH):
    _require_embedding(embedding_VxH, "sampled_vocab")
    rows = _sample_rows(rng, embedding_VxH, int(np.prod(shape[:-1])), num_tokens)
    return rows.reshape(shape)

  return init


def _embed_sequences(embedding_VxH, token_id_lists):
  """Average of each id list's embeddings -> [len(lists), H]."""
  rows = []
  for ids in token_id_lists:
    rows.append(jnp.mean(jnp.take(embedding_VxH, jnp.asarray(ids, jnp.int32), axis=0), axis=0))
  return jnp.stack(rows).astype(jnp.float32)


def class_labels(labels: Sequence[str], vocabulary, num_tokens: int = 5000,
                 label_order: Optional[Sequence[str]] = None) -> PromptInit:
  """First slots: each label's (verbalizer's) sub-token embeddings averaged; rest sampled.

  The paper's best initialization. A prompt shorter than the label set is an error rather than
  a silent truncation of labels. `label_order` (prompt-tuning's CLASS_LABELS): the task's labels
  in the order their slots take, first slot first.
  """
  cc.check("prompts.class_labels", locals(), INITIALIZER_RULES["class_labels"])
  if label_order is not None:
    if sorted(label_order) != sorted(labels):
      raise ValueError(f"prompts.class_labels.label_order {list(label_order)} must hold the "
                       f"task's labels {list(labels)}, each once, in any order")
    labels = list(label_order)
  label_ids = [vocabulary.encode(label) for label in labels]
  empty = [label for label, ids in zip(labels, label_ids) if not ids]
  if empty:
    raise ValueError(f"class_labels: labels {empty} encode to no tokens")

  def init(rng, shape, embedding_VxH):
    _require_embedding(embedding_VxH, "class_labels")
    length = shape[-2]
    if len(label_ids) > length:
      raise PromptShapeError(f"class_labels: {len(label_ids)} labels do not fit a prompt of "
                             f"length {length}; use prompt_length >= {len(label_ids)}")
    return _fill(rng, shape, embedding_VxH, _embed_sequences(embedding_VxH, label_ids),
                 num_tokens)

  return init


def from_text(text: str, vocabulary, num_tokens: int = 5000) -> PromptInit:
  """First slots: the embeddings of `text`'s tokens in order (e.g. a written instruction)."""
  cc.check("prompts.from_text", locals(), INITIALIZER_RULES["from_text"])
  ids = vocabulary.encode(text)
  if not ids:
    raise ValueError(f"from_text: {text!r} encodes to no tokens")

  def init(rng, shape, embedding_VxH):
    _require_embedding(embedding_VxH, "from_text")
    if len(ids) > shape[-2]:
      raise PromptShapeError(f"from_text: the text has {len(ids)} tokens but the prompt length is "
                             f"{shape[-2]}; shorten the text or lengthen the prompt")
    return _fill(rng, shape, embedding_VxH, _embed_sequences(embedding_VxH, [[i] for i in ids]),
                 num_tokens)

  return init


def _fill(rng, shape, embedding_VxH, head_KxH, num_tokens):
  """[..., P, H]: `head_KxH` in the first K slots of every prompt, sampled vocabulary after."""
  length = shape[-2]
  lead = int(np.prod(shape[:-2]))
  rest = _sample_rows(rng, embedding_VxH, lead * (length - head_KxH.shape[0]), num_tokens)
  rest = rest.reshape(lead, length - head_KxH.shape[0], shape[-1])
  head = jnp.broadcast_to(head_KxH, (lead,) + head_KxH.shape)
  return jnp.concatenate([head, rest], axis=1).reshape(shape)


def from_array(values, source: Optional[str] = None) -> PromptInit:
  """A fixed [P, H] (or [N, P, H]) array; a shape mismatch names both shapes (and `source`)."""
  values = np.asarray(values, np.float32)
  where = f"{source}: " if source else ""

  def init(rng, shape, embedding_VxH=None):
    del rng, embedding_VxH
    got, want = tuple(values.shape), tuple(shape)
    if got != want:
      if len(got) == len(want) and got[-1] == want[-1]:
        fix = f"set prompt_length to {got[-2]}, or give a prompt of length {want[-2]}"
      else:
        fix = f"give a prompt made for a model with d_model {want[-1]}"
      raise PromptShapeError(f"{where}prompt values have shape {got} but the model's prompt is "
                             f"{want} ([prompt_length, d_model]); {fix}")
    return jnp.asarray(values)

  return init


def check_fits(init: PromptInit, shape: tuple, vocab_size: int, emb_dim: int) -> None:
  """Raises the initializer's own error (a PromptShapeError, ...) if it cannot make a `shape`
  prompt for a model with this embedding table, without the table's values: the initializer is
  traced on shapes only (nothing is computed or compiled), so a run fails before loading weights.
  """
  embedding = jax.ShapeDtypeStruct((vocab_size, emb_dim), jnp.float32)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw jax.random.PRNGKey
  out = jax.eval_shape(lambda key, table: init(key, tuple(shape), table), rng, embedding)
  if tuple(out.shape) != tuple(shape):
    raise PromptShapeError(f"the prompt initializer made shape {tuple(out.shape)} but the model's "
                           f"prompt is {tuple(shape)} ([prompt_length, d_model])")


def _require_embedding(embedding_VxH: Optional[jax.Array], name: str):
  if embedding_VxH is None:
    raise ValueError(f"{name} initialization needs the model's token embedding table")
