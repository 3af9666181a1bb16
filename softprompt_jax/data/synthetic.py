"""Tiny built-in word tasks, generated from a seed without files: for smoke runs and for
pretraining a tiny model.

Each record is {"instruction", "text", "target", "idx"} (sentiment adds "label": 0 negative,
1 positive). synthetic_<name> reads "<instruction> <text>" ("reverse the words: apple dog
cat" -> "cat dog apple"); taskless_synthetic_<name> reads only the text.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from softprompt_jax import metrics
from softprompt_jax.data.readers import DataError
from softprompt_jax.data.tasks import (Task, class_id_postprocessor, field,
                                       identity_postprocessor, label_target, register_task)

NOUNS = tuple("""apple bird boat bread car cat chair cloud coat dog door field fish flower
garden hat horse house lamp leaf letter moon mountain night paper pencil river road rock
shoe song star stone street sun table tree window winter wood""".split())
POSITIVE = tuple("""amazing beautiful bright brilliant calm charming cheerful delightful
excellent fantastic fine friendly good great happy kind lovely nice perfect pleasant
splendid superb warm wonderful""".split())
NEGATIVE = tuple("""angry awful bad boring broken cold cruel dirty dreadful dull gloomy
horrible nasty noisy painful poor rotten rude sad terrible ugly unpleasant weak
wretched""".split())
SENTIMENT_LABELS = ("negative", "positive")

# name: (instruction, target of the list of words)
SYNTHETIC_TASKS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "copy": ("copy the words:", lambda words: " ".join(words)),
    "reverse": ("reverse the words:", lambda words: " ".join(reversed(words))),
    "sort": ("sort the words:", lambda words: " ".join(sorted(words))),
    "count": ("count the words:", lambda words: str(len(words))),
    "first_word": ("give the first word:", lambda words: words[0]),
    "last_word": ("give the last word:", lambda words: words[-1]),
    "sentiment": ("is this positive or negative:", None),
}
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}


def make_records(name: str, split: str, num_examples: int, seed: int = 0, min_words: int = 3,
                 max_words: int = 8) -> list[dict]:
  """`num_examples` records of task `name`; the same (name, split, seed) gives the same records,
  and each split draws from its own seed stream."""
  if name not in SYNTHETIC_TASKS:
    raise KeyError(f"unknown synthetic task {name!r}; one of {sorted(SYNTHETIC_TASKS)}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for synthetic data; one of {SPLITS}")
  if not 1 <= min_words <= max_words:
    raise ValueError(f"need 1 <= min_words <= max_words; got {min_words}, {max_words}")
  instruction, target_of = SYNTHETIC_TASKS[name]
  rng = np.random.default_rng([seed, SPLITS.index(split), list(SYNTHETIC_TASKS).index(name)])
  records = []
  for i in range(num_examples):
    length = int(rng.integers(min_words, max_words + 1))
    if name == "sentiment":
      label = int(rng.integers(2))
      lexicon = POSITIVE if label else NEGATIVE
      num_sentiment = int(rng.integers(1, min(2, length) + 1))
      words = ([lexicon[j] for j in rng.integers(len(lexicon), size=num_sentiment)]
               + [NOUNS[j] for j in rng.integers(len(NOUNS), size=length - num_sentiment)])
      words = [words[j] for j in rng.permutation(len(words))]
      record = {"label": label, "target": SENTIMENT_LABELS[label]}
    else:
      words = [NOUNS[j] for j in rng.integers(len(NOUNS), size=length)]
      record = {"target": target_of(words)}
    records.append({"instruction": instruction, "text": " ".join(words), "idx": i, **record})
  return records


def synthetic_source(name: str, sizes: dict[str, int] | None = None, seed: int = 0,
                     **options) -> Callable[[str], Iterable[dict]]:
  """split -> records of task `name`, with `sizes` per split (default DEFAULT_SIZES)."""
  sizes = {**DEFAULT_SIZES, **(sizes or {})}

  def source(split: str) -> list[dict]:
    if split not in sizes:
      # A DataError (a user's error), as a directory without the split gives.
      raise DataError(f"synthetic data has no split {split!r}; it has {sorted(sizes)}")
    return make_records(name, split, sizes[split], seed, **options)
  return source


def _preprocessor(with_instruction: bool, classify: bool):
  def preprocess(record: dict, *, training: bool, require_label: bool) -> list[dict]:
    text = field(record, "text")
    inputs = f"{field(record, 'instruction')} {text}" if with_instruction else text
    # A generation target may be empty (the model then learns to stop at once).
    targets = (label_target(record, SENTIMENT_LABELS, required=require_label) if classify
               else field(record, "target", non_empty=False)
               if require_label or "target" in record else "<unk>")
    return [{"inputs": inputs, "targets": targets, "idx": record.get("idx")}]
  return preprocess


def synthetic_tasks(sizes: dict[str, int] | None = None, seed: int = 0) -> list[Task]:
  tasks = []
  for name in SYNTHETIC_TASKS:
    classify = name == "sentiment"
    for prefix, with_instruction in (("", True), ("taskless_", False)):
      tasks.append(Task(
          name=f"{prefix}synthetic_{name}",
          preprocessor=_preprocessor(with_instruction, classify),
          postprocessor=(class_id_postprocessor(SENTIMENT_LABELS) if classify
                         else identity_postprocessor),
          metrics=(metrics.accuracy,) if classify else (metrics.exact_match,),
          choices=SENTIMENT_LABELS if classify else None,
          source=synthetic_source(name, sizes, seed),
          description=f"synthetic {name}: {SYNTHETIC_TASKS[name][0]}"))
  return tasks


for _task in synthetic_tasks():
  register_task(_task, overwrite=True)
