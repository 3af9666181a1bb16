"""Metrics against sklearn / scipy (the references T5 itself calls) and hand-worked cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt_jax import metrics


@pytest.fixture(scope="module")
def sk():
  return pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def scipy_stats():
  return pytest.importorskip("scipy.stats")

# sklearn warns when a drawn sample has a single class; its answer is still the reference.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")

labels = st.lists(st.integers(0, 2), min_size=1, max_size=40)


def _pairs(draw_targets, draw_predictions):
  n = min(len(draw_targets), len(draw_predictions))
  return np.array(draw_targets[:n]), np.array(draw_predictions[:n])


def test_binary_metrics_by_hand():
  targets = [1, 1, 0, 0, 1]
  predictions = [1, 0, 0, 1, 1]  # tp=2 fp=1 fn=1 tn=1
  assert metrics.accuracy(targets, predictions) == {"accuracy": pytest.approx(60.0)}
  assert metrics.f1_score_with_invalid(targets, predictions)["f1"] == pytest.approx(100 * 4 / 6)
  mcc = (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)  # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)...)
  assert metrics.matthews_corrcoef(targets, predictions)["matthews_corrcoef"] == pytest.approx(
      100 * mcc)


def test_invalid_predictions_count_as_wrong_in_f1():
  # -1 (unparseable output) becomes the opposite of the target: a miss for 1, a false alarm
  # for 0.
  targets, predictions = [1, 0, 1], [-1, -1, 1]  # -> [0, 1, 1]: tp=1 fp=1 fn=1
  assert metrics.f1_score_with_invalid(targets, predictions)["f1"] == pytest.approx(50.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=40),
       st.lists(st.integers(-1, 1), min_size=1, max_size=40))
def test_binary_metrics_match_sklearn(sk, t, p):
  t, p = _pairs(t, p)
  assert metrics.accuracy(t, p)["accuracy"] == pytest.approx(100 * sk.accuracy_score(t, p))
  fixed = np.where(p == -1, 1 - t, p)
  assert metrics.f1_score_with_invalid(t, p)["f1"] == pytest.approx(
      100 * sk.f1_score(t, fixed, zero_division=0.0))
  assert metrics.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
      100 * sk.matthews_corrcoef(t, p), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(labels, st.lists(st.integers(-1, 2), min_size=1, max_size=40))
def test_multiclass_metrics_match_sklearn(sk, t, p):
  t, p = _pairs(t, p)
  assert metrics.mean_multiclass_f1(3)(t, p)["mean_3class_f1"] == pytest.approx(
      100 * sk.f1_score(t, p, labels=[0, 1, 2], average="macro", zero_division=0.0))
  assert metrics.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
      100 * sk.matthews_corrcoef(t, p), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.4, 1.2, 2.0, 3.4, 5.0]),
                          st.floats(-1, 5, allow_nan=False)), min_size=3, max_size=30))
def test_correlations_match_scipy(scipy_stats, pairs):
  t, p = np.array(pairs).T
  if np.ptp(t) == 0 or np.ptp(p) == 0:  # undefined for a constant side, NaN as scipy gives
    assert math.isnan(metrics.pearson_corrcoef(t, p)["pearson_corrcoef"])
    return
  assert metrics.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(
      100 * scipy_stats.pearsonr(t, p)[0], abs=1e-6)
  assert metrics.spearman_corrcoef(t, p)["spearman_corrcoef"] == pytest.approx(
      100 * scipy_stats.spearmanr(t, p)[0], abs=1e-6)


def test_correlation_of_a_constant_side_is_nan():
  assert math.isnan(metrics.pearson_corrcoef([1.0, 2.0, 3.0], [0.1, 0.1, 0.1])["pearson_corrcoef"])
  assert math.isnan(metrics.spearman_corrcoef([0.1] * 3, [1, 2, 3])["spearman_corrcoef"])


def test_spearman_uses_average_ranks_for_ties():
  # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; of [1, 2, 3, 4] themselves.
  r_t = np.array([1, 2.5, 2.5, 4])
  expected = np.corrcoef(r_t, [1, 2, 3, 4])[0, 1]
  assert metrics.spearman_corrcoef([1, 2, 2, 3], [1, 2, 3, 4])["spearman_corrcoef"] == (
      pytest.approx(100 * expected))


def test_squad_normalizes_and_takes_the_best_answer():
  targets = [["The Eiffel Tower", "Eiffel"], ["New York City"], ["blue"]]
  predictions = ["eiffel tower!", "York", "red"]
  # 1: "eiffel tower" == normalized first answer -> EM 1, F1 1.
  # 2: "york" vs "new york city": precision 1, recall 1/3 -> F1 0.5; EM 0.
  # 3: nothing in common.
  out = metrics.squad(targets, predictions)
  assert out["em"] == pytest.approx(100 / 3)
  assert out["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_normalize_squad():
  assert metrics.normalize_squad("  The  Cat's hat, an apple!") == "cats hat apple"


def test_multirc_f1a_and_per_question_exact_match():
  # Question A: both answers right; question B: one of two wrong.
  targets = [{"value": 1, "group": "A"}, {"value": 0, "group": "A"},
             {"value": 1, "group": "B"}, {"value": 1, "group": "B"}]
  predictions = [{"value": 1}, {"value": 0}, {"value": 1}, {"value": 0}]
  assert metrics.multirc_f1_over_all_answers(targets, predictions)["f1"] == pytest.approx(
      100 * 2 * 2 / (2 * 2 + 0 + 1))  # tp=2 fp=0 fn=1
  em = metrics.mean_group_metric(metrics.all_match)(targets, predictions)
  assert em == {"exact_match": pytest.approx(50.0)}


def test_deduplicate_scores_first_example_of_each_group():
  targets = [{"value": ["a"], "group": 1}, {"value": ["a"], "group": 1},
             {"value": ["b"], "group": 2}]
  predictions = [{"value": "a"}, {"value": "zzz"}, {"value": "c"}]
  out = metrics.deduplicate_metric(metrics.squad)(targets, predictions)
  assert out["em"] == pytest.approx(50.0)


def test_exact_match_and_benchmark_score():
  assert metrics.exact_match(["a b", "c"], ["a b", "c "]) == {"exact_match": 50.0}
  # SuperGLUE's CB score: the mean of accuracy and macro F1.
  assert metrics.benchmark_score({"accuracy": 90.0, "mean_3class_f1": 80.0}) == 85.0


def test_mismatched_lengths_are_an_error():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="no examples"):
    metrics.accuracy([], [])
