"""Records -> fixed-length int32 batches of this host's rows, deterministic and resumable.

The examples of a split (or of a mixture of tasks) form one stream; training walks it epoch
after epoch, each epoch in its own permutation drawn from (seed, epoch), and a batch may span
two epochs so that every batch is full. Global batch b holds stream positions b*B .. b*B+B-1;
a host keeps only its `rows` of each and tokenizes only those. The iterator's whole state is
the next stream position, so `restore(state())` continues exactly where it stopped.

Evaluation is one pass in order; the last batch is filled with empty (all-pad) rows, which
`Batch.mask` marks. Arrays are what the train / eval steps eat: `encoder_input_tokens` [R, T],
`decoder_input_tokens` and `decoder_target_tokens` [R, S] (EOS appended after trimming, as
seqio's append_eos_after_trim), and `prompt_ids` [R] for a prompt bank.

A `TaskMixture` (data.mixtures) is the tasks of a run that trains one prompt per task: its
batches always carry `prompt_ids` (each example's task's index in the mixture).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from softprompt_jax.data import cache
from softprompt_jax.data.mixtures import TaskMixture, mixture_of
from softprompt_jax.data.readers import DataError, SkipLog, Source, load_split
from softprompt_jax.data.tasks import RecordError, Task, get_task
from softprompt_jax.t5 import shift_right
from softprompt_jax.tokenizers import Vocabulary, get_vocabulary, pad_batch

MIXING = ("proportional", "round_robin")
# What to do with a record that cannot be read or formatted: raise, or leave it out and count it.
BAD_RECORDS = ("error", "skip")


@dataclasses.dataclass
class Batch:
  """One batch of this host's rows."""

  arrays: dict[str, np.ndarray]  # int32; the jitted step's input
  examples: list[dict | None]    # per row: the formatted example (+ "task", "record_index")
  mask: np.ndarray               # bool [R]: real rows (False: eval padding)


@dataclasses.dataclass
class Stats:
  """Counts over the batches this iterator (on this host) has produced, and the bad records
  left out when the data was loaded (bad_records="skip"; the same on every host)."""

  num_examples: int = 0
  num_truncated_inputs: int = 0
  num_truncated_targets: int = 0
  num_skipped_records: int = 0
  # reason ("malformed_json", "empty_field", "unknown_label", ...) -> count
  skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
  # "file:line: message" of the first few skipped records
  first_skipped: list[str] = dataclasses.field(default_factory=list)


def _rows_slice(rows, batch_size: int) -> slice:
  if rows is None:
    return slice(0, batch_size)
  start, stop, step = (rows.start, rows.stop, rows.step) if isinstance(rows, slice) else (
      rows[0], rows[1], None)
  start, stop = start or 0, batch_size if stop is None else stop
  if step not in (None, 1) or not 0 <= start < stop <= batch_size:
    raise ValueError(f"rows must be a contiguous slice within the global batch of "
                     f"{batch_size}; got {rows}")
  return slice(start, stop)


class BatchIterator:
  """Batches of one task or a mixture; see `get_batches`."""

  def __init__(self, tasks: Sequence[Task], examples: Sequence[list[dict]],
               vocabulary: Vocabulary, *, input_length: int, target_length: int,
               batch_size: int, seed: int, shuffle: bool, repeat: bool, rows: slice,
               prompt_ids: Sequence[int] | None, mixing: str):
    self.tasks, self._examples = list(tasks), [list(e) for e in examples]
    self.vocabulary = vocabulary
    self.input_length, self.target_length = input_length, target_length
    self.batch_size, self.seed, self.shuffle, self.repeat = batch_size, seed, shuffle, repeat
    self.rows, self.prompt_ids, self.mixing = rows, prompt_ids, mixing
    self.sizes = [len(e) for e in self._examples]
    self._offsets = np.cumsum([0] + self.sizes)
    self._permutations: dict[tuple[int, int], np.ndarray] = {}
    self.position = 0
    self.stats = Stats()

  @property
  def num_examples(self) -> int:
    """Examples in one pass over the data (all tasks)."""
    return int(self._offsets[-1])

  @property
  def num_batches(self) -> int | None:
    """Batches in one eval pass; None when repeating."""
    return None if self.repeat else math.ceil(self.num_examples / self.batch_size)

  # --- Position -> example ----------------------------------------------------------------------

  def _order(self, stream: int, epoch: int, size: int) -> np.ndarray | None:
    """The permutation of `stream` (-1: the whole mixture, k: task k) in `epoch`."""
    if not self.shuffle:
      return None
    key = (stream, epoch)
    if key not in self._permutations:
      if len(self._permutations) > 8:  # training only ever looks at the last epoch or two
        self._permutations.pop(next(iter(self._permutations)))
      rng = np.random.default_rng([self.seed, epoch] + ([] if stream < 0 else [stream]))
      self._permutations[key] = rng.permutation(size)
    return self._permutations[key]

  def _example(self, position: int) -> dict | None:
    """The example at stream `position`; None past the end of an eval pass."""
    if not self.repeat and position >= self.num_examples:
      return None
    if self.mixing == "round_robin" and self.repeat:
      task, j = position % len(self.tasks), position // len(self.tasks)
      epoch, index = divmod(j, self.sizes[task])
      order = self._order(task, epoch, self.sizes[task])
      return self._examples[task][index if order is None else int(order[index])]
    epoch, index = divmod(position, self.num_examples)
    order = self._order(-1, epoch, self.num_examples)
    flat = index if order is None else int(order[index])
    task = int(np.searchsorted(self._offsets, flat, side="right")) - 1
    return self._examples[task][flat - self._offsets[task]]

  # --- Iteration --------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> Batch | dict[str, np.ndarray]:
    if not self.repeat and self.position >= self.num_examples:
      raise StopIteration
    start = self.position
    examples = [self._example(start + r) for r in range(self.rows.start, self.rows.stop)]
    self.position += self.batch_size
    batch = self._tokenize(examples)
    return batch

  def _tokenize(self, examples: list[dict | None]) -> Batch:
    mask = np.array([ex is not None for ex in examples], dtype=bool)
    real = [ex for ex in examples if ex is not None]
    vocab = self.vocabulary
    num_rows = len(examples)
    arrays = {name: np.zeros((num_rows, length), np.int32) for name, length in (
        ("encoder_input_tokens", self.input_length),
        ("decoder_input_tokens", self.target_length),
        ("decoder_target_tokens", self.target_length))}
    if real:
      inputs, cut_inputs = pad_batch([vocab.encode(ex["inputs"]) for ex in real],
                                     self.input_length, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
      targets, cut_targets = pad_batch([vocab.encode(ex["targets"]) for ex in real],
                                       self.target_length, eos_id=vocab.eos_id,
                                       pad_id=vocab.pad_id)
      arrays["encoder_input_tokens"][mask] = inputs
      arrays["decoder_target_tokens"][mask] = targets
      # Teacher forcing: the targets shifted right by one, starting from 0.
      arrays["decoder_input_tokens"][mask] = shift_right(targets)
      self.stats.num_examples += len(real)
      self.stats.num_truncated_inputs += cut_inputs
      self.stats.num_truncated_targets += cut_targets
    if self.prompt_ids is not None:
      task_index = {task.name: k for k, task in enumerate(self.tasks)}
      arrays["prompt_ids"] = np.array(
          [self.prompt_ids[task_index[ex["task"]]] if ex is not None else 0 for ex in examples],
          dtype=np.int32)
    return Batch(arrays=arrays, examples=examples, mask=mask)

  # --- Saving and restoring -----------------------------------------------------------------

  def state(self) -> dict:
    """JSON-serialisable position, the same on every host (positions are global).

    `position` counts examples from the start of the stream; `epoch` and `index` are the same
    position in passes over all `num_examples` (for round-robin mixing, over their sum).
    """
    epoch, index = divmod(self.position, self.num_examples)
    return {"seed": self.seed, "epoch": epoch, "index": index, "position": self.position,
            "num_examples": self.num_examples}

  def restore(self, state: dict) -> None:
    """Continue from `state()`; refuses a state of another seed or another data size."""
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"this data state was saved with seed {state['seed']}; the iterator has "
                       f"seed {self.seed}")
    if state.get("num_examples", self.num_examples) != self.num_examples:
      raise ValueError(f"this data state was saved over {state['num_examples']} examples; the "
                       f"data now has {self.num_examples}: the positions would not match")
    position = state.get("position")
    if position is None:
      position = state["epoch"] * self.num_examples + state["index"]
    self.position = int(position)

  def reset(self) -> None:
    """Back to the first batch (to run an eval pass again without reading the files again)."""
    self.position = 0


def _resolve_sources(tasks: Sequence[Task], source) -> list[Source]:
  names = [task.name for task in tasks]
  if len(tasks) > 1 and isinstance(source, dict) and set(source) <= set(names):
    sources = [source.get(name) for name in names]
  elif len(tasks) > 1 and source is not None:
    if not isinstance(source, (list, tuple)) or len(source) != len(tasks):
      # A DataError (DATA on the command line): a user's error, still a ValueError.
      got = (f"a dict with keys {sorted(source)}" if isinstance(source, dict)
             else f"a {type(source).__name__}")
      raise DataError(f"the data of a mixture of {names} is a dict by task name (each a file, "
                      f"a directory or a dict by split) or a list, one per task; got {got}")
    sources = list(source)
  else:
    sources = [source] if len(tasks) == 1 else [None] * len(tasks)
  for task, src in zip(tasks, sources):
    if src is None and task.source is None:
      # A DataError: on the command line this is a missing DATA, a user's error.
      raise DataError(f"task {task.name} has no built-in data: pass source= (DATA on the "
                      "command line: a file, a directory, or a dict of them by split)")
  return [task.source if src is None else src for task, src in zip(tasks, sources)]


_SKIP_HINT = " (fix the record, or set bad_records='skip' to leave bad records out and count them)"


def check_bad_records(bad_records: str) -> None:
  if bad_records not in BAD_RECORDS:
    raise ValueError(f"bad_records must be 'error' (stop at the first bad record) or 'skip' "
                     f"(leave bad records out and count them); got {bad_records!r}")


def load_examples(task: Task, split: str, source: Source, *, training: bool,
                  require_label: bool, skip: SkipLog | None = None) -> list[dict]:
  """The formatted examples of a split, each with "task" and "record_index".

  A bad record raises a DataError / RecordError naming its file, line and field; with `skip`,
  it is left out and counted there instead. Examples read from files are cached (data.cache):
  a run reads each split once.
  """
  key = cache.files_key(source, split)
  if key is not None:
    try:
      key = (task, split, key, training, require_label, skip is not None)
      hash(key)
    except TypeError:  # a task holding something unhashable: read it every time
      key = None
  cached = cache.get(key)
  if cached is None:
    own_skip = SkipLog() if skip is not None else None
    cached = (_read_examples(task, split, source, training=training,
                             require_label=require_label, skip=own_skip), own_skip)
    cache.put(key, cached)
  examples, skipped = cached
  if skip is not None:  # the bad records of this split, counted in the caller's log
    skip.num_skipped += skipped.num_skipped
    for reason, count in skipped.by_reason.items():
      skip.by_reason[reason] = skip.by_reason.get(reason, 0) + count
    skip.first += skipped.first[:max(0, skip.max_first - len(skip.first))]
  return list(examples)


def _read_examples(task: Task, split: str, source: Source, *, training: bool,
                   require_label: bool, skip: SkipLog | None) -> list[dict]:
  try:
    data = load_split(source, split, skip)
  except DataError as e:
    if e.reason == "file":  # not one record's fault: skipping would not help
      raise
    raise DataError(f"{e}{_SKIP_HINT}", e.reason) from None
  examples = []
  for i, record in enumerate(data.records):
    try:
      formatted = task.examples(record, training=training, require_label=require_label)
    except RecordError as e:
      if skip is None:
        raise RecordError(f"{data.locations[i]}: {e}{_SKIP_HINT}", e.reason) from None
      skip(RecordError(f"{data.locations[i]}: {e}", e.reason))
      continue
    examples += [{**ex, "task": task.name, "record_index": i} for ex in formatted]
  if not examples:
    split_source = source.get(split) if isinstance(source, dict) else source
    where = f" in {split_source}" if isinstance(split_source, (str, os.PathLike)) else ""
    num_skipped = skip.num_skipped if skip is not None else 0
    skipped = (f" ({num_skipped} bad record{'s' * (num_skipped != 1)} skipped; first: "
               f"{skip.first[0] if skip.first else '-'})" if num_skipped else "")
    raise DataError(f"{task.name}: split {split!r} has no examples{where}{skipped}")
  return examples


def check_splits(task: str | Task | Sequence[str | Task], source: Source = None, *,
                 train: str | None = "train", evals: Sequence[str] = ("validation",),
                 bad_records: str = "error") -> dict[str, int]:
  """Reads and formats every record of the splits a run will use, as it will use them (the
  training split as training data, each eval split with its labels required unless it is a
  test split, the same bad-records policy), so that a bad record or an empty split stops the
  run before its first step instead of at its first evaluation. Tokenizes nothing; the
  examples stay cached for the run's iterators. Returns the number of examples of each split
  (for a mixture, a list of tasks: over all its tasks, each read from its own source).
  """
  check_bad_records(bad_records)
  tasks = list(mixture_of(task) or [get_task(task)])
  skip = SkipLog() if bad_records == "skip" else None
  splits = ([(train, True, True)] if train is not None else []) + [
      (split, False, not split.startswith("test")) for split in evals]
  return {split: sum(len(load_examples(t, split, s, training=training,
                                       require_label=require_label, skip=skip))
                     for t, s in zip(tasks, _resolve_sources(tasks, source)))
          for split, training, require_label in dict.fromkeys(splits)}


def mixture_sources(mixture: TaskMixture, source: Source) -> list[Source]:
  """Each task's source in a mixture (`source`: a dict by task name, a list, or None)."""
  return _resolve_sources(list(mixture), source)


def get_batches(task: str | Task | Sequence[str | Task], split: str,
                vocabulary: Vocabulary | str, *, input_length: int, target_length: int,
                batch_size: int, seed: int = 0, shuffle: bool | None = None,
                repeat: bool | None = None, rows: slice | tuple[int, int] | None = None,
                source: Source = None, prompt_id: int | Sequence[int] | None = None,
                mixing: str = "proportional", require_labels: bool | None = None,
                max_examples: int | None = None, bad_records: str = "error") -> BatchIterator:
  """Batches of `task`'s `split` (a list of tasks: a mixture) for this host's `rows`.

  repeat: endless epochs (training; the default for split "train"), else one padded pass.
  shuffle: a new permutation per epoch from (seed, epoch); defaults to `repeat`.
  rows: this host's rows of each global batch (`partitioning.process_rows`); default all.
  source: where the records are (readers.load_split); default the task's built-in data. For
    a mixture, a dict by task name or a list, one per task.
  prompt_id: adds `prompt_ids`: one id for a single task; for a mixture, one per task (default
    0, 1, ...; a TaskMixture, even of one task, always has them), each example carrying its
    task's id.
  mixing: "proportional" (one stream of all examples, so each task in proportion to its size)
    or "round_robin" (tasks take turns, example by example); eval passes go task by task.
  require_labels: a record without its label is an error (default: unless split is test*).
  max_examples: keep only the first examples of each task (a quick eval).
  bad_records: "error": a bad record (malformed JSON, invalid UTF-8, a missing or empty field,
    an unknown label) raises an error naming file, line and field; "skip": it is left out and
    counted in `stats` (num_skipped_records, skipped_by_reason, first_skipped).
  """
  tasks = [get_task(t) for t in ([task] if isinstance(task, (str, Task)) else task)]
  if not tasks:
    raise ValueError("no tasks")
  if len({t.name for t in tasks}) != len(tasks):
    raise ValueError(f"a task appears twice in the mixture {[t.name for t in tasks]}")
  if mixing not in MIXING:
    raise ValueError(f"mixing must be one of {MIXING}; got {mixing!r}")
  check_bad_records(bad_records)
  if min(batch_size, input_length, target_length, max_examples or 1) < 1:
    raise ValueError("batch_size, input_length, target_length and max_examples must be positive")
  repeat = split == "train" if repeat is None else repeat
  shuffle = repeat if shuffle is None else shuffle
  require_labels = not split.startswith("test") if require_labels is None else require_labels
  if prompt_id is None and (len(tasks) > 1 or isinstance(task, TaskMixture)):
    prompt_id = list(range(len(tasks)))
  if prompt_id is not None:
    prompt_ids = [prompt_id] if isinstance(prompt_id, int) else list(prompt_id)
    if len(prompt_ids) != len(tasks):
      raise ValueError(f"{len(prompt_ids)} prompt ids for {len(tasks)} tasks")
  else:
    prompt_ids = None
  skip = SkipLog() if bad_records == "skip" else None
  examples = [load_examples(t, split, s, training=repeat, require_label=require_labels,
                            skip=skip)[:max_examples]
              for t, s in zip(tasks, _resolve_sources(tasks, source))]
  iterator = BatchIterator(tasks, examples, get_vocabulary(vocabulary),
                           input_length=input_length, target_length=target_length,
                           batch_size=batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
                           rows=_rows_slice(rows, batch_size), prompt_ids=prompt_ids,
                           mixing=mixing)
  if skip is not None:
    iterator.stats.num_skipped_records = skip.num_skipped
    iterator.stats.skipped_by_reason = dict(skip.by_reason)
    iterator.stats.first_skipped = list(skip.first)
  return iterator


def train_batches(task, split: str, vocabulary, *, batch_size: int, input_length: int,
                  target_length: int, seed: int = 0, rows=None, source: Source = None,
                  **options) -> BatchIterator:
  """Endless shuffled batches (a `Batch`; its `arrays` are the train step's input)."""
  return get_batches(task, split, vocabulary, batch_size=batch_size,
                     input_length=input_length, target_length=target_length, seed=seed,
                     rows=rows, source=source, repeat=True, **options)


def eval_batches(task, split: str, vocabulary, *, batch_size: int, input_length: int,
                 target_length: int, rows=None, source: Source = None,
                 max_examples: int | None = None, **options) -> BatchIterator:
  """One pass in order, the last batch padded; `next()` is a Batch (arrays, examples, mask)."""
  return get_batches(task, split, vocabulary, batch_size=batch_size, input_length=input_length,
                     target_length=target_length, rows=rows, source=source, repeat=False,
                     shuffle=False, max_examples=max_examples, **options)
