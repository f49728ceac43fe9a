"""GLUE metrics against scikit-learn and scipy on fixed random inputs."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from rmlora_jax import metrics


def _classes(seed, n=200, k=2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  # Mostly right, so the correlations are far from 0.
  predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
  return predictions, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3])
def test_classification_helpers_match_sklearn(seed, k):
  predictions, labels = _classes(seed, k=k)
  np.testing.assert_allclose(
      metrics.matthews_corrcoef(predictions, labels),
      skm.matthews_corrcoef(labels, predictions), rtol=1e-12,
  )
  np.testing.assert_allclose(
      metrics.accuracy(predictions, labels), skm.accuracy_score(labels, predictions)
  )
  if k == 2:
    np.testing.assert_allclose(
        metrics.f1_binary(predictions, labels), skm.f1_score(labels, predictions), rtol=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 11, 300) / 2.0  # STS-B-like scores with many ties.
  predictions = np.round(labels + rng.normal(0, 1.0, 300), 1).astype(np.float32)
  np.testing.assert_allclose(
      metrics.pearson(predictions, labels), stats.pearsonr(predictions, labels)[0], rtol=1e-6
  )
  np.testing.assert_allclose(
      metrics.spearman(predictions, labels), stats.spearmanr(predictions, labels)[0], rtol=1e-10
  )
  np.testing.assert_allclose(metrics.rank_average(labels), stats.rankdata(labels))


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
      "accuracy": lambda: skm.accuracy_score(y, p),
      "f1": lambda: skm.f1_score(y, p),
      "mcc": lambda: skm.matthews_corrcoef(y, p),
      "pearson": lambda: stats.pearsonr(p, y)[0],
      "spearman": lambda: stats.spearmanr(p, y)[0],
  }
  for name, value in got.items():
    assert isinstance(value, float)
    np.testing.assert_allclose(value, reference[name](), rtol=1e-6, err_msg=name)


def test_degenerate_inputs():
  ones = np.ones(10, np.int64)
  mixed = np.array([0, 1] * 5)
  # All one class: sklearn's MCC is 0.0; F1 with no positives at all is 0.0.
  assert metrics.matthews_corrcoef(ones, mixed) == skm.matthews_corrcoef(mixed, ones) == 0.0
  assert metrics.matthews_corrcoef(ones, ones) == skm.matthews_corrcoef(ones, ones) == 0.0
  zeros = np.zeros(10, np.int64)
  assert metrics.f1_binary(zeros, zeros) == 0.0
  np.testing.assert_allclose(metrics.f1_binary(ones, mixed), skm.f1_score(mixed, ones))
  # Constant predictions: correlations are undefined; reported as 0.0.
  assert metrics.pearson(np.full(5, 2.0), np.arange(5.0)) == 0.0
  assert metrics.spearman(np.full(5, 2.0), np.arange(5.0)) == 0.0


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
