"""The model side of the server: one frozen PromptedT5 with a prompt bank, run on batches padded
to a few fixed shapes (batch size x input length). Each shape is compiled once, at start-up;
a request never causes a compilation, and neither does a change of the bank (its values are an
argument of the same shape)."""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import numpy as np

from softprompt_jax import decoding
from softprompt_jax.prompted_t5 import PromptedT5, with_prompt
from softprompt_jax.serving.prompt_bank import PromptBank
from softprompt_jax.tokenizers import Vocabulary


def length_buckets(lengths: Sequence[int], input_length: int) -> tuple[int, ...]:
  """The padded input lengths: the given ones below `input_length`, and `input_length`."""
  return tuple(sorted({n for n in lengths if n < input_length} | {input_length}))


class ModelRunner:
  """Greedy predictions and label scores for batches of (prompt slot, token ids) rows.

  `frozen_params` are the T5's (no prompt); the bank's values are copied to the device when it
  changed, by `params()`, which the batcher calls on its event loop as it forms a batch; the
  batch then runs with that copy, whatever the bank does meanwhile."""

  def __init__(self, net: PromptedT5, frozen_params: dict, bank: PromptBank,
               vocabulary: Vocabulary, *, batch_sizes: Sequence[int], lengths: Sequence[int],
               target_length: int, max_labels: int):
    self.net, self.bank, self.vocabulary = net, bank, vocabulary
    self.batch_sizes = tuple(sorted(set(batch_sizes)))
    self.lengths = tuple(sorted(set(lengths)))
    self.target_length, self.max_labels = target_length, max_labels
    self._frozen = frozen_params
    self._params, self._version = None, None

  @property
  def max_batch(self) -> int:
    return self.batch_sizes[-1]

  @property
  def input_length(self) -> int:
    return self.lengths[-1]

  def params(self) -> dict:
    if self._version != self.bank.version:
      # A copy: on CPU a device array may share the NumPy buffer, which the bank writes.
      self._params = with_prompt(self._frozen, jax.device_put(self.bank.values.copy()))
      self._version = self.bank.version
    return self._params

  def padded_shape(self, num_rows: int, longest: int) -> tuple[int, int]:
    """The smallest compiled (batch, length) that holds `num_rows` rows of up to `longest`."""
    batch = next(b for b in self.batch_sizes if b >= num_rows)
    return batch, next(n for n in self.lengths if n >= longest)

  def _inputs(self, slots: Sequence[int], tokens: Sequence[Sequence[int]]):
    batch, length = self.padded_shape(len(tokens), max(len(t) for t in tokens))
    tokens_BxT = np.zeros((batch, length), np.int32)
    ids_B = np.full((batch,), slots[0], np.int32)
    for row, ids in enumerate(tokens):
      tokens_BxT[row, :len(ids)] = ids
    # Padding rows repeat the first request, so they end when it does (greedy decoding stops
    # once every row has ended).
    tokens_BxT[len(tokens):] = tokens_BxT[0]
    ids_B[:len(slots)] = slots
    return tokens_BxT, ids_B

  def predict(self, params: dict, slots: Sequence[int],
              tokens: Sequence[Sequence[int]]) -> list[str]:
    """Greedy decoding, as `infer` decodes: the text of each row's token ids (EOS included)."""
    tokens_BxT, ids_B = self._inputs(slots, tokens)
    ids_BxL = np.asarray(decoding.greedy_decode(self.net, params, tokens_BxT, self.target_length,
                                                prompt_ids=ids_B))
    return [self.vocabulary.decode(row) for row in ids_BxL[:len(tokens)]]

  def score(self, params: dict, slots: Sequence[int], tokens: Sequence[Sequence[int]],
            labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Rank classification: log p(label | inputs) of each row's labels (`labels[i]` holds row
    i's label token ids, [C_i, target_length], C_i <= max_labels)."""
    tokens_BxT, ids_B = self._inputs(slots, tokens)
    labels_BxCxS = np.zeros((len(ids_B), self.max_labels, self.target_length), np.int32)
    for row, label_ids in enumerate(labels):
      labels_BxCxS[row, :len(label_ids)] = label_ids
    labels_BxCxS[len(labels):] = labels_BxCxS[0]
    _, scores_BxC = decoding.rank_classify(self.net, params, tokens_BxT, labels_BxCxS,
                                           return_scores=True, prompt_ids=ids_B)
    scores_BxC = np.asarray(scores_BxC)
    return [scores_BxC[row, :len(label_ids)] for row, label_ids in enumerate(labels)]

  def warm_up(self, scoring: bool = True) -> int:
    """Compiles every (batch, length) shape for decoding (and scoring); returns how many."""
    params = self.params()
    eos = [self.vocabulary.eos_id]
    label = self.vocabulary.encode_batch(["x"], max_length=self.target_length)
    shapes = list(itertools.product(self.batch_sizes, self.lengths))
    for batch, length in shapes:
      # One row of the full length makes the padded shape (batch, length).
      rows = [[1] * (length - 1) + eos] + [eos] * (batch - 1)
      self.predict(params, [0] * batch, rows)
      if scoring:
        self.score(params, [0] * batch, rows, [label] * batch)
    return len(shapes) * (2 if scoring else 1)
