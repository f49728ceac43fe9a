"""GLUE metrics against hand-worked cases and plain NumPy formulas.

The library computes them with scikit-learn and SciPy, so those are not the
reference here: the references below are written from the formulas
(confusion counts, tie-averaged ranks) in NumPy, and the small cases are
worked by hand.
"""

import numpy as np
import pytest

from rmlora_jax import metrics


# --------------------------------------------------------------------------- references


def ref_mcc(predictions, labels):
  """Multi-class Matthews correlation ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``; 0.0 when undefined."""
  classes = np.union1d(predictions, labels)
  t = np.array([np.sum(labels == k) for k in classes], np.float64)
  p = np.array([np.sum(predictions == k) for k in classes], np.float64)
  c, s = float(np.sum(predictions == labels)), float(labels.size)
  denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return (c * s - t @ p) / denominator if denominator > 0 else 0.0


def ref_f1(predictions, labels, positive=1):
  """``2 tp / (2 tp + fp + fn)`` of the positive class; 0.0 when undefined."""
  tp = np.sum((predictions == positive) & (labels == positive))
  fp = np.sum((predictions == positive) & (labels != positive))
  fn = np.sum((predictions != positive) & (labels == positive))
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def ref_pearson(x, y):
  """Covariance over the product of standard deviations, in float64; 0.0 for a constant side."""
  x = np.asarray(x, np.float64) - np.mean(x, dtype=np.float64)
  y = np.asarray(y, np.float64) - np.mean(y, dtype=np.float64)
  denominator = np.sqrt((x @ x) * (y @ y))
  return (x @ y) / denominator if denominator > 0 else 0.0


def ref_ranks(values):
  """1-based ranks, tied values sharing the mean of the ranks they span (O(n^2), plainly)."""
  values = np.asarray(values)
  below = np.sum(values[None, :] < values[:, None], axis=1)
  equal = np.sum(values[None, :] == values[:, None], axis=1)
  return below + (equal + 1) / 2.0


def ref_spearman(x, y):
  return ref_pearson(ref_ranks(x), ref_ranks(y))


def test_reference_ranks_average_ties():
  np.testing.assert_array_equal(ref_ranks([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])
  np.testing.assert_array_equal(ref_ranks([0.5, 0.5]), [1.5, 1.5])


# --------------------------------------------------------------------------- hand-worked cases


def test_accuracy_by_hand():
  assert metrics.accuracy(np.array([0, 1, 1, 0, 2]), np.array([0, 1, 0, 0, 1])) == pytest.approx(3 / 5)
  assert metrics.accuracy(np.array([], int), np.array([], int)) == 0.0


def test_f1_by_hand():
  p, y = np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
  # tp 2, fp 1, fn 1.
  assert metrics.f1_binary(p, y) == pytest.approx(4 / 6)
  # Positive 0: tp 2 (indices 2, 5), fp 1 (index 4), fn 1 (index 1).
  assert metrics.f1_binary(p, y, positive=0) == pytest.approx(4 / 6)
  # Three classes, the others negative: tp 1, fp 1, fn 1 for class 1; class 2 has no tp.
  p3, y3 = np.array([1, 2, 1, 0]), np.array([1, 1, 2, 0])
  assert metrics.f1_binary(p3, y3) == pytest.approx(0.5)
  assert metrics.f1_binary(p3, y3, positive=2) == 0.0
  # No positive anywhere: undefined, 0.0.
  zeros = np.zeros(10, np.int64)
  assert metrics.f1_binary(zeros, zeros) == 0.0
  assert metrics.f1_binary(np.array([], int), np.array([], int)) == 0.0


def test_mcc_by_hand_binary_and_multiclass():
  # TP 2, TN 2, FP 1, FN 1: (2*2 - 1*1) / sqrt(3 * 3 * 3 * 3).
  p, y = np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
  assert metrics.matthews_corrcoef(p, y) == pytest.approx(1 / 3, rel=1e-12)
  # Three classes: c = 4 correct of s = 6, true counts t = (2, 2, 2), predicted p = (2, 3, 1):
  # (4*6 - 12) / sqrt((36 - 14)(36 - 12)).
  p3, y3 = np.array([0, 1, 1, 1, 2, 0]), np.array([0, 0, 1, 1, 2, 2])
  assert metrics.matthews_corrcoef(p3, y3) == pytest.approx(12 / np.sqrt(22 * 24), rel=1e-12)
  # Perfect and perfectly inverted predictions.
  assert metrics.matthews_corrcoef(y, y) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)


def test_mcc_is_zero_for_a_constant_side():
  ones = np.ones(10, np.int64)
  mixed = np.array([0, 1] * 5)
  assert metrics.matthews_corrcoef(ones, mixed) == 0.0
  assert metrics.matthews_corrcoef(mixed, ones) == 0.0
  assert metrics.matthews_corrcoef(ones, ones) == 0.0
  assert metrics.matthews_corrcoef(np.array([], int), np.array([], int)) == 0.0


def test_correlations_by_hand():
  # Deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26).
  x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
  assert metrics.pearson(x, y) == pytest.approx(11 / np.sqrt(130), rel=1e-12)
  assert metrics.pearson(x, -y) == pytest.approx(-11 / np.sqrt(130), rel=1e-12)
  # Ties: ranks (1, 2.5, 2.5, 4) and (1, 4, 2.5, 2.5), deviations give 2.25 / 4.5.
  assert metrics.spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 2])) == pytest.approx(0.5, rel=1e-12)
  # Monotone but not linear: Spearman 1, Pearson below.
  cube = np.arange(1.0, 6.0) ** 3
  assert metrics.spearman(np.arange(5.0), cube) == pytest.approx(1.0)
  assert metrics.pearson(np.arange(5.0), cube) < 0.99


@pytest.mark.parametrize("fn", [metrics.pearson, metrics.spearman])
def test_correlations_are_zero_where_undefined(fn):
  assert fn(np.full(5, 2.0), np.arange(5.0)) == 0.0
  assert fn(np.arange(5.0), np.full(5, 2.0)) == 0.0
  assert fn(np.array([1.0]), np.array([3.0])) == 0.0
  assert fn(np.array([]), np.array([])) == 0.0


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.f1_binary, metrics.matthews_corrcoef,
                                metrics.pearson, metrics.spearman])
def test_mismatched_inputs_name_the_metric(fn):
  with pytest.raises(ValueError, match=rf"^{fn.__name__}: .* got shapes \(4,\) and \(3,\)"):
    fn(np.zeros(4, int), np.zeros(3, int))
  with pytest.raises(ValueError, match=rf"^{fn.__name__}: .*1-D"):
    fn(np.zeros((2, 2), int), np.zeros((2, 2), int))


# --------------------------------------------------------------------------- random inputs


def _classes(seed, n=200, k=2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  # Mostly right, so the correlations are far from 0.
  predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
  return predictions, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_match_the_formulas(seed, k):
  predictions, labels = _classes(seed, k=k)
  np.testing.assert_allclose(metrics.matthews_corrcoef(predictions, labels), ref_mcc(predictions, labels),
                             rtol=1e-12)
  assert metrics.accuracy(predictions, labels) == pytest.approx(np.mean(predictions == labels))
  for positive in range(k):
    np.testing.assert_allclose(metrics.f1_binary(predictions, labels, positive),
                               ref_f1(predictions, labels, positive), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_the_formulas_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 11, 300) / 2.0  # STS-B-like scores with many ties.
  predictions = np.round(labels + rng.normal(0, 1.0, 300), 1).astype(np.float32)
  assert len(np.unique(labels)) < 20 and len(np.unique(predictions)) < 200
  np.testing.assert_allclose(metrics.pearson(predictions, labels), ref_pearson(predictions, labels), rtol=1e-10)
  np.testing.assert_allclose(metrics.spearman(predictions, labels), ref_spearman(predictions, labels), rtol=1e-10)


@pytest.mark.parametrize(
    "task, expected",
    [("cola", {"mcc", "accuracy"}), ("mrpc", {"accuracy", "f1"}), ("qqp", {"accuracy", "f1"}),
     ("rte", {"accuracy"}), ("mnli", {"accuracy"}), ("stsb", {"pearson", "spearman"})],
)
def test_glue_metrics_ignores_weight_zero_rows(task, expected):
  rng = np.random.default_rng(3)
  if task == "stsb":
    labels = rng.uniform(0, 5, 100).astype(np.float32)
    predictions = (labels + rng.normal(0, 1, 100)).astype(np.float32)
  else:
    predictions, labels = _classes(4, n=100, k=3 if task == "mnli" else 2)
  weights = (rng.random(100) < 0.8).astype(np.float32)
  # Garbage in the weight-0 rows must not matter.
  noisy_predictions = np.where(weights == 1, predictions, predictions[::-1])
  got = metrics.glue_metrics(task, noisy_predictions, labels, weights)
  assert set(got) == expected
  keep = weights == 1
  p, y = predictions[keep], labels[keep]
  reference = {
      "accuracy": lambda: np.mean(p == y),
      "f1": lambda: ref_f1(p, y),
      "mcc": lambda: ref_mcc(p, y),
      "pearson": lambda: ref_pearson(p, y),
      "spearman": lambda: ref_spearman(p, y),
  }
  for name, value in got.items():
    assert isinstance(value, float)
    np.testing.assert_allclose(value, reference[name](), rtol=1e-6, err_msg=name)


def test_glue_metrics_rejects_bad_input():
  with pytest.raises(ValueError, match="weights must be 0/1"):
    metrics.glue_metrics("rte", np.zeros(3, int), np.zeros(3, int), np.array([1, 0.5, 1]))
  with pytest.raises(ValueError, match="no examples with weight 1"):
    metrics.glue_metrics("rte", np.zeros(3, int), np.zeros(3, int), np.zeros(3))
  with pytest.raises(ValueError, match="argmax"):
    metrics.glue_metrics("rte", np.zeros((3,), np.float32), np.zeros(3, int))
  with pytest.raises(ValueError, match="shapes"):
    metrics.glue_metrics("rte", np.zeros(4, int), np.zeros(3, int))
  with pytest.raises(ValueError, match="known tasks"):
    metrics.glue_metrics("squad", np.zeros(3, int), np.zeros(3, int))
