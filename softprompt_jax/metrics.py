"""Evaluation metrics with T5's names and scales (percentages), in plain numpy.

Each metric takes (targets, predictions), already postprocessed by the task, and returns a dict
of floats, as `t5.evaluation.metrics` does: `accuracy`, `f1`, `mean_3class_f1`,
`matthews_corrcoef`, `pearson_corrcoef`, `spearman_corrcoef`, `exact_match`, SQuAD's `em`/`f1`.
Targets and predictions of the grouped tasks (MultiRC, ReCoRD) are dicts {"value", "group"}.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Sequence

import numpy as np

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]


def _reports(*names: str):
  """Marks a metric function with the keys it returns (`Task.metric_names` lists them)."""
  def mark(fn):
    fn.metric_names = names
    return fn
  return mark


def _check(targets, predictions) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not len(targets):
    raise ValueError("no examples to score")


def _pair(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
  _check(targets, predictions)
  return np.asarray(targets), np.asarray(predictions)


# --- Classification ---------------------------------------------------------------------------

@_reports("accuracy")
def accuracy(targets, predictions) -> dict[str, float]:
  t, p = _pair(targets, predictions)
  return {"accuracy": 100 * float(np.mean(t == p))}


@_reports("exact_match")
def exact_match(targets, predictions) -> dict[str, float]:
  """Share of predictions equal to their target (strings compared as they are)."""
  _check(targets, predictions)
  return {"exact_match": 100 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def _f1(tp: int, fp: int, fn: int) -> float:
  # sklearn's convention: 0 when there is nothing to get right and nothing was predicted.
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _class_f1(t: np.ndarray, p: np.ndarray, label) -> float:
  return _f1(int(np.sum((t == label) & (p == label))), int(np.sum((t != label) & (p == label))),
             int(np.sum((t == label) & (p != label))))


@_reports("f1")
def f1_score_with_invalid(targets, predictions) -> dict[str, float]:
  """Binary F1 of class 1; a prediction other than 0 or 1 counts as wrong (T5's `f1`)."""
  t, p = _pair(targets, predictions)
  p = np.where((p == 0) | (p == 1), p, 1 - t)
  return {"f1": 100 * _class_f1(t, p, 1)}


def mean_multiclass_f1(num_classes: int) -> MetricFn:
  """Macro F1 over the classes 0..num_classes-1 (invalid predictions are misses)."""
  def mean_f1(targets, predictions):
    t, p = _pair(targets, predictions)
    scores = [_class_f1(t, p, c) for c in range(num_classes)]
    return {f"mean_{num_classes}class_f1": 100 * float(np.mean(scores))}
  return _reports(f"mean_{num_classes}class_f1")(mean_f1)


@_reports("matthews_corrcoef")
def matthews_corrcoef(targets, predictions) -> dict[str, float]:
  """Multiclass Matthews correlation (Gorodkin's R_K); an invalid prediction is its own class."""
  t, p = _pair(targets, predictions)
  _, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
  k = codes.max() + 1
  confusion = np.zeros((k, k), np.float64)
  np.add.at(confusion, (codes[:len(t)], codes[len(t):]), 1)
  t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
  n, correct = confusion.sum(), np.trace(confusion)
  cov_tp = correct * n - t_sum @ p_sum
  cov_pp = n * n - p_sum @ p_sum
  cov_tt = n * n - t_sum @ t_sum
  mcc = cov_tp / np.sqrt(cov_tt * cov_pp) if cov_tt * cov_pp else 0.0
  return {"matthews_corrcoef": 100 * float(mcc)}


# --- Regression -------------------------------------------------------------------------------

def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """NaN when either side is constant (as scipy)."""
  if (x == x[0]).all() or (y == y[0]).all():
    return float("nan")  # tested directly: the mean of equal values need not equal them
  x, y = x - x.mean(), y - y.mean()
  x, y = x / np.abs(x).max(), y / np.abs(y).max()  # scaled so that tiny values do not underflow
  return float(np.clip(x @ y / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their positions."""
  order = np.argsort(x, kind="stable")
  x_sorted = x[order]
  starts = np.flatnonzero(np.r_[True, x_sorted[1:] != x_sorted[:-1]])
  stops = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x))
  ranks[order] = np.repeat((starts + stops + 1) / 2, stops - starts)
  return ranks


@_reports("pearson_corrcoef")
def pearson_corrcoef(targets, predictions) -> dict[str, float]:
  t, p = _pair(targets, predictions)
  return {"pearson_corrcoef": 100 * _pearson(t.astype(float), p.astype(float))}


@_reports("spearman_corrcoef")
def spearman_corrcoef(targets, predictions) -> dict[str, float]:
  t, p = _pair(targets, predictions)
  return {"spearman_corrcoef": 100 * _pearson(_average_ranks(t.astype(float)),
                                              _average_ranks(p.astype(float)))}


# --- Question answering (SQuAD v1.1 script, as T5's qa_utils) ---------------------------------

def normalize_squad(text: str) -> str:
  """Lowercase; drop punctuation, the articles a/an/the and extra whitespace."""
  text = "".join(c for c in text.lower() if c not in string.punctuation)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens, prediction_tokens = target.split(), prediction.split()
  common = sum((collections.Counter(target_tokens) & collections.Counter(prediction_tokens))
               .values())
  if not common:
    return 0.0
  precision, recall = common / len(prediction_tokens), common / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


@_reports("em", "f1")
def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD exact match `em` and token `f1`, each the best over an example's reference answers."""
  _check(targets, predictions)
  em, f1 = [], []
  for answers, prediction in zip(targets, predictions):
    if isinstance(answers, str):
      answers = [answers]
    answers = [normalize_squad(a) for a in answers] or [""]
    prediction = normalize_squad(prediction)
    em.append(max(float(a == prediction) for a in answers))
    f1.append(max(_token_f1(a, prediction) for a in answers))
  return {"em": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}


# --- Grouped examples (MultiRC, ReCoRD) --------------------------------------------------------

@_reports("exact_match")
def all_match(targets, predictions) -> dict[str, float]:
  """100 if every prediction equals its target, else 0 (MultiRC's per-question EM)."""
  _check(targets, predictions)
  return {"exact_match": 100 * float(list(targets) == list(predictions))}


def mean_group_metric(metric_fn: MetricFn) -> MetricFn:
  """`metric_fn` on each group of {"value", "group"} targets, averaged over the groups."""
  def grouped(targets, predictions):
    _check(targets, predictions)
    groups = collections.defaultdict(lambda: ([], []))
    for target, prediction in zip(targets, predictions):
      groups[target["group"]][0].append(target["value"])
      groups[target["group"]][1].append(prediction["value"])
    scores = collections.defaultdict(list)
    for group_targets, group_predictions in groups.values():
      for name, value in metric_fn(group_targets, group_predictions).items():
        scores[name].append(value)
    return {name: float(np.mean(values)) for name, values in scores.items()}
  return _reports(*getattr(metric_fn, "metric_names", ()))(grouped)


def deduplicate_metric(metric_fn: MetricFn) -> MetricFn:
  """`metric_fn` on the first example of each group only (ReCoRD's repeated queries)."""
  def deduplicated(targets, predictions):
    _check(targets, predictions)
    seen, kept_targets, kept_predictions = set(), [], []
    for target, prediction in zip(targets, predictions):
      if target["group"] not in seen:
        seen.add(target["group"])
        kept_targets.append(target["value"])
        kept_predictions.append(prediction["value"])
    return metric_fn(kept_targets, kept_predictions)
  return _reports(*getattr(metric_fn, "metric_names", ()))(deduplicated)


@_reports("f1")
def multirc_f1_over_all_answers(targets, predictions) -> dict[str, float]:
  """MultiRC's F1a: binary F1 over every answer option of every question."""
  return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


# --- Combining --------------------------------------------------------------------------------

def compute(metric_fns: Sequence[MetricFn], targets, predictions) -> dict[str, float]:
  """All of `metric_fns` on the same examples, merged into one dict."""
  out: dict[str, float] = {}
  for fn in metric_fns:
    out.update(fn(targets, predictions))
  return out


def benchmark_score(scores: dict[str, float]) -> float:
  """A task's GLUE / SuperGLUE leaderboard score: the mean of the metrics it reports.

  CB: mean of accuracy and macro F1; MultiRC: of F1a and EM; ReCoRD: of F1 and EM; MRPC, QQP:
  of F1 and accuracy; STS-B: of Pearson and Spearman; the others have a single metric.
  """
  if not scores:
    raise ValueError("no metrics to average")
  return float(np.mean(list(scores.values())))
