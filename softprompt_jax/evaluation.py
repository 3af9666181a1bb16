"""Predictions and metrics: the one batched greedy-decoding loop (eval, infer and the demo use
it), predictions for a batch (rank classification or decoding), and a split's metrics."""

from __future__ import annotations

from typing import Optional

import numpy as np

from softprompt_jax import decoding, progress
from softprompt_jax.data import pipeline
from softprompt_jax.data.mixtures import mixture_of
from softprompt_jax.errors import ConfigError


def decode_in_batches(model, params, tokens_NxT: np.ndarray, *, batch_size: int,
                      target_length: int, prompt_ids_N: Optional[np.ndarray] = None
                      ) -> np.ndarray:
  """Greedy token ids [N, target_length] of every row, `batch_size` rows at a time; the last
  batch is padded, so one compiled shape serves them all. `prompt_ids_N` picks each row's
  prompt from a bank."""
  rows = []
  for start in range(0, len(tokens_NxT), batch_size):
    chunk = np.asarray(tokens_NxT[start:start + batch_size])
    pad = batch_size - len(chunk)
    kwargs = {}
    if prompt_ids_N is not None:
      kwargs["prompt_ids"] = np.pad(np.asarray(prompt_ids_N[start:start + batch_size],
                                               np.int32), (0, pad))
    ids_BxL = np.asarray(decoding.greedy_decode(model, params, np.pad(chunk, ((0, pad), (0, 0))),
                                                target_length, **kwargs))
    # Decoding may stop early when every row has ended: pad to the full length.
    ids_BxL = np.pad(ids_BxL, ((0, 0), (0, target_length - ids_BxL.shape[1])))
    rows.append(ids_BxL[:len(chunk)].astype(np.int32))
  return np.concatenate(rows) if rows else np.zeros((0, target_length), np.int32)


def predict(model, params, task, examples_batch, vocabulary, target_length: int,
            **encoder_kwargs) -> list[str]:
  """Text predictions for one host-local batch: rank classification when the task has a fixed
  label set (as T5 evaluates classification), greedy decoding otherwise."""
  tokens = np.asarray(examples_batch["encoder_input_tokens"])
  if task.choices:
    candidates = vocabulary.encode_batch(list(task.choices), max_length=target_length)
    chosen = np.asarray(decoding.rank_classify(model, params, tokens, candidates,
                                               **encoder_kwargs))
    return [task.choices[i] for i in chosen]
  decoded = np.asarray(decoding.greedy_decode(model, params, tokens, target_length,
                                              **encoder_kwargs))
  return [vocabulary.decode(row) for row in decoded]


def run_eval(setup, params, split: str, *, data_source, batch_size: int, input_length: int,
             target_length: int, max_examples: Optional[int],
             bad_records: str = "error") -> dict:
  """Metrics of the task's `split` with `params` (frozen + prompt) and a run's `setup`
  (run_setup.Setup), and the counts of what was evaluated, as training reports its own:
  `num_examples`, `num_truncated_inputs` / `num_truncated_targets` (longer than input_length /
  target_length, so cut) and, with bad_records='skip', `num_skipped_records`. A long pass
  shows its progress on stderr. A mixture (data.mixtures.TaskMixture) evaluates each task with
  its own prompt id; see TaskMixture.metrics for the keys."""
  shapes = dict(batch_size=batch_size, input_length=input_length, target_length=target_length,
                max_examples=max_examples, bad_records=bad_records)
  mixture = mixture_of(setup.task)
  if mixture is None:
    return _task_eval(setup, params, setup.task, split, data_source, None, **shapes)
  sources = pipeline.mixture_sources(mixture, data_source)
  return mixture.metrics({task.name: _task_eval(setup, params, task, split, source, k, **shapes)
                          for k, (task, source) in enumerate(zip(mixture, sources))})


def _task_eval(setup, params, task, split: str, source, prompt_id: Optional[int], *,
               batch_size: int, input_length: int, target_length: int,
               max_examples: Optional[int], bad_records: str) -> dict:
  stream = pipeline.eval_batches(task, split, setup.vocabulary, source=source,
                                 batch_size=batch_size, input_length=input_length,
                                 target_length=target_length, max_examples=max_examples,
                                 bad_records=bad_records, prompt_id=prompt_id)
  examples, predictions = [], []
  label = f"eval {split}" if prompt_id is None else f"eval {split} {task.name}"
  with progress.Progress(label, stream.num_examples) as shown:
    for batch in stream:
      ids = {} if prompt_id is None else {"prompt_ids": batch.arrays["prompt_ids"]}
      texts = predict(setup.model, params, task, batch.arrays, setup.vocabulary, target_length,
                      **ids)
      real = [i for i, keep in enumerate(batch.mask) if keep]
      examples += [batch.examples[i] for i in real]
      predictions += [texts[i] for i in real]
      shown.update(len(examples))
  if not examples:
    raise ConfigError(f"{task.name}: split {split!r} has no examples to evaluate")
  metrics = task.evaluate(examples, predictions)
  metrics["num_examples"] = float(len(examples))
  metrics["num_truncated_inputs"] = float(stream.stats.num_truncated_inputs)
  metrics["num_truncated_targets"] = float(stream.stats.num_truncated_targets)
  if stream.stats.num_skipped_records:
    metrics["num_skipped_records"] = float(stream.stats.num_skipped_records)
  return metrics
