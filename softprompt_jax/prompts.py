"""Soft-prompt initializers: plain functions returning `init(rng, shape, embedding_VxH) -> [P, H]`.

Each factory is a plain function (gin-configurable) that closes over its settings; the returned
initializer gets the frozen model's token-embedding table when the prompt is made, so the
vocabulary-based initializations use the real pretrained embeddings, not random ones.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import output_files
from softprompt_jax.checkpoints.prompt_variable import read_checkpoint_variable
from softprompt_jax.errors import UserError
from softprompt_jax.peft_interop import load_peft_adapter

PromptInit = Callable[[jax.Array, tuple, jax.Array], jax.Array]

_NPY_MAGIC = b"\x93NUMPY"

# Ids below this are pad/eos/unk in T5's vocabularies; never sampled as prompt seeds.
NUM_SPECIAL_IDS = 3


class PromptShapeError(UserError, ValueError):
  """A prompt's shape does not fit the model: both shapes are in the message."""


class PromptFileError(UserError, ValueError):
  """A prompt file that is not a plain float array (a pickle, an .npz, a truncated file)."""


NUM_TOKENS = cc.integer(1)
# What the initializers' gin-bound parameters accept (labels and vocabulary are passed by the
# run, from the task and the model).
INITIALIZER_RULES = {
    "random_uniform": {"scale": cc.number(0, low_open=True)},
    "sampled_vocab": {"num_tokens": NUM_TOKENS},
    "class_labels": {"labels": cc.anything(), "vocabulary": cc.anything(),
                     "num_tokens": NUM_TOKENS},
    "from_text": {"text": cc.text(), "vocabulary": cc.anything(), "num_tokens": NUM_TOKENS},
    "from_npy": {"path": cc.path(optional=True)},
    "from_t5x_checkpoint": {"path": cc.path(), "variable": cc.text()},
    "from_peft_adapter": {"path": cc.path()},
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


def class_labels(labels: Sequence[str], vocabulary, num_tokens: int = 5000) -> PromptInit:
  """First slots: each label's (verbalizer's) sub-token embeddings averaged; rest sampled.

  The paper's best initialization. A prompt shorter than the label set is an error rather than
  a silent truncation of labels.
  """
  cc.check("prompts.class_labels", locals(), INITIALIZER_RULES["class_labels"])
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


def from_npy(path: Optional[str]) -> PromptInit:
  """A prompt saved as `.npy` float32 [P, H] (the released prompts' format); never unpickles."""
  cc.check("prompts.from_npy", locals(), INITIALIZER_RULES["from_npy"])
  if path is None:
    raise PromptFileError("prompts.from_npy: no prompt file given; set PROMPT_FILE (or "
                          "prompts.from_npy.path) to a .npy [prompt_length, d_model] file")
  return from_array(load_npy(path), source=str(path))


def from_peft_adapter(path: str) -> PromptInit:
  """The prompt of a PEFT prompt-tuning adapter directory (json + safetensors; never unpickles)."""
  cc.check("prompts.from_peft_adapter", locals(), INITIALIZER_RULES["from_peft_adapter"])
  return from_array(load_peft_adapter(path), source=str(path))


def load_npy(path: str) -> np.ndarray:
  """A float [P, H] (or [N, P, H]) array from a `.npy` file. Pickled payloads (raw pickles,
  object arrays) are refused without being unpickled: numpy reads with allow_pickle=False."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {path} does not exist")
  with open(path, "rb") as f:
    magic = f.read(len(_NPY_MAGIC))
  if magic != _NPY_MAGIC:
    if magic[:1] == b"\x80":  # pickle protocol 2+
      what = "a pickle, refused (unpickling runs whatever code it holds)"
    elif magic[:4] == b"PK\x03\x04":
      what = "an .npz archive, not a .npy array"
    else:
      what = "not a .npy file"
    raise PromptFileError(f"{path}: {what}; save the prompt with numpy.save as a float "
                          "[prompt_length, d_model] array")
  try:
    values = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise PromptFileError(f"{path}: not a plain .npy array (pickled objects are refused): "
                          f"{e}") from None
  except (EOFError, OSError) as e:
    raise PromptFileError(f"{path}: a truncated or unreadable .npy file ({e})") from None
  if values.ndim not in (2, 3) or not np.issubdtype(values.dtype, np.floating):
    raise PromptShapeError(f"{path}: expected a float [prompt_length, d_model] array, got "
                           f"{values.dtype} {values.shape}")
  return values.astype(np.float32)


def save_npy(path: str, prompt_PxH) -> None:
  """Writes [P, H] float32 `.npy`, the format the released prompts use, through output_files: a
  file is replaced atomically (a crash never leaves a half-written prompt under its name), `-`
  or a pipe or device is streamed to."""
  values = np.asarray(prompt_PxH, np.float32)
  if values.ndim != 2:
    raise PromptShapeError(f"save_npy: a prompt is [prompt_length, d_model], got {values.shape}")
  buffer = io.BytesIO()  # np.save asks a real file for its position, which a pipe has not
  np.save(buffer, values, allow_pickle=False)
  output_files.write_bytes(path, buffer.getvalue())


def from_t5x_checkpoint(path: str, variable: str = "prompt/prompt") -> PromptInit:
  """A prompt variable stored in a t5x checkpoint (e.g. a prompt-tuning run's output)."""
  cc.check("prompts.from_t5x_checkpoint", locals(), INITIALIZER_RULES["from_t5x_checkpoint"])
  return from_array(read_checkpoint_variable(path, variable), source=f"{path} ({variable})")


def _require_embedding(embedding_VxH: Optional[jax.Array], name: str):
  if embedding_VxH is None:
    raise ValueError(f"{name} initialization needs the model's token embedding table")


@dataclasses.dataclass(frozen=True)
class Initializer:
  """A registered initializer factory and what the run passes it besides its gin-bound
  parameters: `labels` (the task's class labels, as a list of strings) and `vocabulary` (the
  run's tokenizer), each as a keyword argument of that name. It returns a `PromptInit`,
  `init(rng, shape, embedding_VxH) -> prompt`."""
  factory: Callable[..., PromptInit]
  needs_labels: bool = False
  needs_vocabulary: bool = False


# The initializers a gin file can name as @prompts.<name> (gin_setup registers each one).
INITIALIZERS: dict[str, Initializer] = {}


def register_initializer(name: str, factory: Callable[..., PromptInit], *,
                         needs_labels: bool = False, needs_vocabulary: bool = False) -> None:
  INITIALIZERS[name] = Initializer(factory, needs_labels, needs_vocabulary)


register_initializer("random_uniform", random_uniform)
register_initializer("sampled_vocab", sampled_vocab)
register_initializer("class_labels", class_labels, needs_labels=True, needs_vocabulary=True)
register_initializer("from_text", from_text, needs_vocabulary=True)
register_initializer("from_npy", from_npy)
register_initializer("from_t5x_checkpoint", from_t5x_checkpoint)
register_initializer("from_peft_adapter", from_peft_adapter)
